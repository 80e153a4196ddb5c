"""What one seed of the language-model story depends on (LMConfig, checked by check_config)
and what it compares: the arms, and the budgets as shares of the decoder layers removed."""
from dataclasses import dataclass
from typing import List, Optional, Tuple

from ffr_fast.study.lm.corpus import DATA_SOURCES

HEALINGS = ("finetune", "distill")
REMOVED_FRACTIONS = (0.25, 0.5)
SELECTION_FRACTION = 0.5  # the budget the learning rate and the arms' weights are chosen at


@dataclass
class LMConfig:
    """Everything one seed of the story depends on (recorded in each seed's JSON)."""
    data: str = "stdlib"
    data_root: Optional[str] = None
    layers: int = 8
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    window: int = 128
    batch_size: int = 8
    # 500 steps: at 250 every arm still sat on the plateau near 3.8 bits per byte (lr 3e-3:
    # 3.79 at 250 steps, 2.93 at 500), where methods cannot be told apart
    steps: int = 500
    heal_steps: int = 50
    heal_lr: float = 1e-3
    # One learning rate by default, so that a seed fits 15 minutes; 3e-3 beat 1e-2 at 500
    # steps (2.93 against 3.12 validation bits per byte, no regularizer, seed 0); --lrs
    # gives every arm a grid
    lrs: Tuple[float, ...] = (3e-3,)
    ffr_weights: Tuple[float, ...] = (0.01, 0.03)
    layerdrop_rates: Tuple[float, ...] = (0.1, 0.2)
    eval_windows: int = 64
    generate_tokens: int = 64
    threads: int = 2

    @property
    def intermediate(self) -> int:
        return int(round(self.hidden * 8 / 3 / 8)) * 8  # Llama's ~2.7x, a multiple of 8


def check_config(config: LMConfig) -> None:
    """Refuses settings the story cannot run with, naming the setting and what to do."""
    if config.data not in DATA_SOURCES:
        raise ValueError(f"--data must be one of {DATA_SOURCES}, got {config.data!r}")
    if config.data == "text" and not config.data_root:
        raise ValueError("--data text needs --data-root DIR, the folder of text files to use")
    if config.data == "stdlib" and config.data_root:
        raise ValueError("--data-root is for --data text; the stdlib corpus is found itself")
    if config.layers < 4 or config.layers % 4:
        raise ValueError(f"--layers must be a multiple of 4 (the budgets remove 25% and 50% of "
                         f"the decoder layers), got {config.layers}")
    if config.hidden % config.heads or config.heads % config.kv_heads:
        raise ValueError(f"--hidden ({config.hidden}) must be a multiple of the {config.heads} "
                         f"heads, and the heads of the {config.kv_heads} key-value heads")
    for name in ("window", "batch_size", "steps", "heal_steps", "eval_windows",
                 "generate_tokens", "threads"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in ("lrs", "ffr_weights", "layerdrop_rates"):
        if not getattr(config, name) or not all(v > 0 for v in getattr(config, name)):
            raise ValueError(f"{name} needs at least one value, each > 0")
    if not all(rate < 1 for rate in config.layerdrop_rates):
        raise ValueError("a LayerDrop rate is a probability below 1")


@dataclass
class Arm:
    name: str
    label: str
    regularizer: str  # "none", "ffr", "layerdrop"
    weights: Tuple[float, ...]  # FFR's weights or LayerDrop's rates; (0,) for none
    layers: Optional[int] = None  # a scratch arm's depth; None: the full depth, then pruned


def arms(config: LMConfig) -> List[Arm]:
    full = config.layers
    return [Arm("none", "no regularizer", "none", (0.0,)),
            Arm("ffr", "FFR", "ffr", config.ffr_weights),
            Arm("layerdrop", "LayerDrop", "layerdrop", config.layerdrop_rates),
            *[Arm(f"scratch{depth}", f"{depth} layers from scratch", "none", (0.0,), depth)
              for depth in kept_depths(full)]]


def kept_depths(layers: int) -> List[int]:
    return [layers - removed_count(layers, f) for f in REMOVED_FRACTIONS]


def removed_count(layers: int, fraction: float) -> int:
    return int(round(layers * fraction))
