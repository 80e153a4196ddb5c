"""The language-model story (`ffr-fast demo-lm`): a byte-level Hugging Face LlamaForCausalLM
trained on real text, made shallower by removing decoder layers, against today's
depth-pruning baselines.

    corpus   the running interpreter's standard library sources (or any folder of text),
             split into train / validation / test by a hash of each file's relative path
    arms     no regularizer, FFR (FFRLoss on the residual stream), LayerDrop, and models of
             the pruned depths trained from scratch on the tokens of training plus healing
    rules    Block Influence (ShortGPT), Gromov et al.'s angular distance (a contiguous
             run), and dropping the last n layers before the final norm
    healing  a short fine-tune on the LM loss, and distillation from the unpruned model (KL
             on the logits, as Minitron does); the same steps for every arm

Every arm gets the same training tokens and the same learning-rate grid; the learning rate,
FFR's weight and LayerDrop's rate are chosen by one rule for all: the lowest validation bits
per byte of the model as deployed at the 50% budget (cut by the rule best on validation
straight after removal, then fine-tune healed; healing every rule of every candidate would
not fit the time budget); a scratch-trained model, deployed as it is, by its own validation
bits per byte. The chosen model of each arm is then cut by every rule at both budgets and
healed both ways; the rule reported per arm and budget is the one best on validation after
fine-tune healing. Pruning goes
through the library (residual_branches, prune(remove_branches=...)), so every pruned model
is a real, smaller LlamaForCausalLM.
"""
import copy
import hashlib
import json
import math
import statistics
import sysconfig
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ffr_fast
from ffr_fast.modes import evaluating
from ffr_fast.study import checkpoint, plots, regularizers
from ffr_fast.study.demo import Spread, markdown_table, within_spread
from ffr_fast.torchvision_loader import load_torchvision

SPLITS = ("train", "val", "test")
# Tenths of the files (by path hash) that go to each split.
SPLIT_TENTHS = {"train": 8, "val": 1, "test": 1}
# Standard-library folders that are not the library's own source: its test suites, the IDLE
# editor, and installed third-party packages.
STDLIB_EXCLUDED = ("test", "tests", "idlelib", "site-packages")
VOCAB = 256  # bytes are the tokens
DATA_SOURCES = ("stdlib", "text")
RULES = ("influence", "angular", "last")
RULE_LABELS = {"influence": "Block Influence (ShortGPT)",
               "angular": "angular distance (Gromov et al.)", "last": "drop the last n"}
HEALINGS = ("finetune", "distill")
REMOVED_FRACTIONS = (0.25, 0.5)
SELECTION_FRACTION = 0.5  # the budget the learning rate and the arms' weights are chosen at
DEMO_SEEDS = (0, 1, 2)
SEED_FILENAME = "seed{}.json"


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
    steps: int = 250
    heal_steps: int = 30
    heal_lr: float = 1e-3
    lrs: Tuple[float, ...] = (1e-3, 3e-3)
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


# --- data -------------------------------------------------------------------------------

@dataclass
class Corpus:
    """The bytes of each split, and what identifies the corpus in the results."""
    splits: Dict[str, torch.Tensor]  # split -> uint8 tokens, its files concatenated
    files: Dict[str, List[str]]  # split -> relative paths, sorted
    sha256: str  # over every file's relative path and bytes, in path order
    skipped: List[str]  # files of a text folder that are not UTF-8 text (named, not hidden)

    def describe(self) -> dict:
        return {"sha256": self.sha256, "files": {s: len(f) for s, f in self.files.items()},
                "bytes": {s: int(t.numel()) for s, t in self.splits.items()},
                "skipped_not_utf8": self.skipped}


def split_of(relative_path: str) -> str:
    """The split a file belongs to: a hash of its relative path, so the split does not
    depend on which other files exist, nor on the order they are listed in."""
    tenth = int(hashlib.sha256(relative_path.encode()).hexdigest(), 16) % 10
    bound = 0
    for split in SPLITS:
        bound += SPLIT_TENTHS[split]
        if tenth < bound:
            return split
    raise AssertionError("SPLIT_TENTHS must sum to 10")


def stdlib_files(root: Path) -> List[Path]:
    """The standard library's .py files under `root`, without the STDLIB_EXCLUDED packages."""
    return sorted(p for p in root.rglob("*.py")
                  if not set(p.relative_to(root).parts[:-1]) & set(STDLIB_EXCLUDED))


def load_corpus(data: str = "stdlib", root: Optional[str] = None) -> Corpus:
    """The corpus of `data` ("stdlib": this interpreter's standard library; "text": every
    UTF-8 file under `root`), split by path hash."""
    if data == "stdlib":
        base = Path(sysconfig.get_paths()["stdlib"])
        paths = stdlib_files(base)
    else:
        base = Path(root)
        if not base.is_dir():
            raise ValueError(f"--data-root {root!r} is not a folder")
        paths = sorted(p for p in base.rglob("*") if p.is_file())
    chunks: Dict[str, List[bytes]] = {s: [] for s in SPLITS}
    files: Dict[str, List[str]] = {s: [] for s in SPLITS}
    digest, skipped = hashlib.sha256(), []
    for path in paths:
        relative = path.relative_to(base).as_posix()
        content = path.read_bytes()
        try:
            content.decode("utf-8")
        except UnicodeDecodeError:
            skipped.append(relative)
            continue
        digest.update(relative.encode() + b"\0" + content + b"\0")
        split = split_of(relative)
        chunks[split].append(content)
        files[split].append(relative)
    tokens = {s: torch.frombuffer(bytearray(b"\n".join(c)), dtype=torch.uint8) if c
              else torch.zeros(0, dtype=torch.uint8) for s, c in chunks.items()}
    return Corpus(tokens, files, digest.hexdigest(), skipped)


def check_corpus(corpus: Corpus, window: int) -> None:
    short = [s for s in SPLITS if corpus.splits[s].numel() < window + 1]
    if short:
        raise ValueError(f"the corpus' {short} split(s) hold fewer than window + 1 = "
                         f"{window + 1} bytes: give a larger folder or a smaller --window")


def training_batches(tokens: torch.Tensor, window: int, batch_size: int, steps: int, seed: int):
    """`steps` batches of `batch_size` windows at random offsets, from a generator of its own."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, tokens.numel() - window, (batch_size,), generator=generator)
        yield torch.stack([tokens[s:s + window] for s in starts.tolist()]).long()


def evaluation_windows(tokens: torch.Tensor, window: int, count: int) -> torch.Tensor:
    """`count` windows spread evenly over a split (fewer if the split is short)."""
    starts = np.unique(np.linspace(0, tokens.numel() - window, count).astype(int))
    return torch.stack([tokens[s:s + window] for s in starts]).long()


# --- model, training, evaluation --------------------------------------------------------

def _transformers():
    load_torchvision()  # before transformers, on a CPU-only torch
    import transformers

    return transformers


def build_model(config: LMConfig, layers: int, seed: int) -> nn.Module:
    transformers = _transformers()
    torch.manual_seed(seed)
    settings = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=config.hidden, intermediate_size=config.intermediate,
        num_hidden_layers=layers, num_attention_heads=config.heads,
        num_key_value_heads=config.kv_heads, max_position_embeddings=config.window +
        config.generate_tokens, bos_token_id=None, eos_token_id=None, pad_token_id=0,
        # eager attention: on CPU, with heads this small, sdpa's backward is slower
        attn_implementation="eager")
    return transformers.LlamaForCausalLM(settings)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) on the next-byte distributions, averaged over positions."""
    vocab = student_logits.shape[-1]
    return F.kl_div(F.log_softmax(student_logits.reshape(-1, vocab).float(), -1),
                    F.log_softmax(teacher_logits.reshape(-1, vocab).float(), -1),
                    log_target=True, reduction="batchmean")


def train_lm(model: nn.Module, tokens: torch.Tensor, config: LMConfig, steps: int, lr: float,
             seed: int, regularizer: str = "none", weight: float = 0.0,
             teacher: Optional[nn.Module] = None) -> List[float]:
    """AdamW with a linear warm-up and a cosine decay; the LM loss (plus the regularizer),
    or, with a `teacher`, the distillation loss alone. Returns the loss every 10 steps."""
    penalty = regularizers.build(model, regularizer, weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(
        (step + 1) / warmup, 0.5 * (1 + math.cos(math.pi * step / steps))))
    torch.manual_seed(seed)  # LayerDrop's draws
    history = []
    model.train()
    try:
        batches = training_batches(tokens, config.window, config.batch_size, steps, seed)
        for step, ids in enumerate(batches):
            if teacher is None:
                loss = model(input_ids=ids, labels=ids).loss + penalty()
            else:
                with torch.no_grad():
                    target = teacher(input_ids=ids).logits
                loss = distillation_loss(model(input_ids=ids).logits, target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the training loss is {loss.item()} at step {step} "
                                         f"(lr {lr}): lower the learning rates")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            if step % 10 == 0:
                history.append(loss.item())
    finally:
        penalty.remove()
    model.eval()
    return history


def bits_per_byte(model: nn.Module, windows: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-byte cross-entropy in bits over the windows (every byte is one token)."""
    total, count = 0.0, 0
    with evaluating(model), torch.no_grad():
        for ids in windows.split(batch_size):
            logits = model(input_ids=ids).logits[:, :-1]
            total += float(F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1),
                                           reduction="sum"))
            count += ids[:, 1:].numel()
    return total / count / math.log(2)


def _layer_names(model: nn.Module, ids: torch.Tensor) -> List[str]:
    return [branch.name for branch in ffr_fast.residual_branches(model, ids)]


def residual_stream(model: nn.Module, names: Sequence[str], ids: torch.Tensor
                    ) -> List[torch.Tensor]:
    """The stream at the input of the first decoder layer and at every layer's output."""
    seen: List[torch.Tensor] = []

    def hook(module, args, output):
        if not seen:
            seen.append(args[0])
        seen.append(output[0] if isinstance(output, tuple) else output)

    handles = [model.get_submodule(name).register_forward_hook(hook) for name in names]
    try:
        with evaluating(model), torch.no_grad():
            model(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def flow(model: nn.Module, ids: torch.Tensor) -> Dict[str, float]:
    """Per decoder layer ||x_out - x_in|| / ||x_in||, over the tokens of `ids`."""
    names = _layer_names(model, ids)
    stream = residual_stream(model, names, ids)
    return {f"layer {i}": float((b - a).norm() / a.norm())
            for i, (a, b) in enumerate(zip(stream, stream[1:]))}


def layers_to_remove(model: nn.Module, ids: torch.Tensor, count: int) -> Dict[str, List[str]]:
    """For each rule in RULES, the `count` decoder layers it removes, measured on `ids`
    (validation windows) with one residual_branches() call and one forward."""
    branches = ffr_fast.residual_branches(model, ids)
    names = [b.name for b in branches]
    if not 0 < count < len(names):
        raise ValueError(f"cannot remove {count} of {len(names)} decoder layers")
    # ShortGPT: the layers that change their input least
    ranked = sorted(range(len(names)), key=lambda i: branches[i].influence)
    # Gromov et al.: the contiguous run whose input and output are closest in angle
    stream = residual_stream(model, names, ids)
    distances = [angular_distance(stream[start], stream[start + count])
                 for start in range(len(names) - count + 1)]
    start = int(np.argmin(distances))
    return {"influence": [names[i] for i in sorted(ranked[:count])],
            "angular": names[start:start + count],
            # the last n decoder layers; the final norm and the head stay
            "last": names[-count:]}


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """arccos(cosine similarity) / pi between the two streams, averaged over the tokens."""
    cosine = F.cosine_similarity(a.flatten(0, -2).double(), b.flatten(0, -2).double(), dim=-1)
    return float(torch.arccos(cosine.clamp(-1, 1)).mean() / math.pi)


def tokens_per_second(model: nn.Module, prompt: torch.Tensor, new_tokens: int,
                      repeats: int = 3) -> float:
    """Greedy generate() throughput, batch 1, the best of `repeats` runs."""
    settings = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    best = math.inf
    with evaluating(model), torch.no_grad():
        model.generate(prompt, **settings)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            model.generate(prompt, **settings)
            best = min(best, time.perf_counter() - start)
    return new_tokens / best


# --- one seed ---------------------------------------------------------------------------

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


@dataclass
class Windows:
    probe: torch.Tensor  # validation windows the removal rules measure on
    val: torch.Tensor
    test: torch.Tensor


def _cuts(model, config: LMConfig, corpus: Corpus, windows: Windows, seed: int, fractions,
          healings, teacher, done: Optional[Dict[str, dict]] = None,
          heal_best_only: bool = False) -> Dict[str, dict]:
    """For each budget and rule: the layers removed and the bits per byte (validation and
    test) straight after removal and after each healing; rules that remove the same layers
    share one cut and one healing. `heal_best_only` heals only the rule best on validation
    straight after removal (how candidates are scored); what `done` holds is not redone.
    The healed models come along under "_models" (left out of the JSON)."""
    results: Dict[str, dict] = dict(done or {})
    for fraction in fractions:
        keys = {rule: f"{fraction:g}/{rule}" for rule in RULES}
        plan = ({rule: results[key]["removed"] for rule, key in keys.items()}
                if all(key in results for key in keys.values()) else
                layers_to_remove(model, windows.probe, removed_count(config.layers, fraction)))
        by_layers: Dict[Tuple[str, ...], dict] = {}
        for rule, key in keys.items():
            names = tuple(plan[rule])
            if key not in results and names in by_layers:
                results[key] = by_layers[names]
            elif key not in results:
                pruned = ffr_fast.prune(model, windows.probe, remove_branches=list(names)).model
                results[key] = {"removed": list(names), "_models": {"pruned": pruned},
                                "pruned": {"val": bits_per_byte(pruned, windows.val),
                                           "test": bits_per_byte(pruned, windows.test)}}
            by_layers[names] = results[key]
        entries = list(by_layers.values())
        if heal_best_only:
            entries = [min(entries, key=lambda e: e["pruned"]["val"])]
        for entry in entries:
            for healing in healings:
                if healing in entry:
                    continue
                healed = copy.deepcopy(entry["_models"]["pruned"])
                train_lm(healed, corpus.splits["train"], config, config.heal_steps,
                         config.heal_lr, seed + 1000,
                         teacher=teacher if healing == "distill" else None)
                entry[healing] = {"val": bits_per_byte(healed, windows.val),
                                  "test": bits_per_byte(healed, windows.test)}
                entry["_models"][healing] = healed
    return results


def _selection_score(cuts: Dict[str, dict]) -> float:
    """The lowest validation bits per byte at the selection budget after fine-tune healing."""
    return min(cuts[f"{SELECTION_FRACTION:g}/{rule}"].get("finetune", {"val": math.inf})["val"]
               for rule in RULES)


def run_seed(config: LMConfig, corpus: Corpus, seed: int, progress=print) -> dict:
    """Every arm on one seed: the candidates of each arm, the chosen one, its cuts."""
    torch.set_num_threads(config.threads)
    windows = Windows(evaluation_windows(corpus.splits["val"], config.window, 8),
                      evaluation_windows(corpus.splits["val"], config.window, config.eval_windows),
                      evaluation_windows(corpus.splits["test"], config.window,
                                         config.eval_windows))
    train_tokens = corpus.splits["train"]
    record = {"seed": seed, "arms": {}}
    chosen_models = {}
    for arm in arms(config):
        started = time.perf_counter()
        candidates = []
        for lr in config.lrs:
            for weight in arm.weights:
                depth = arm.layers or config.layers
                # a scratch model trains on the tokens of training plus healing
                steps = config.steps + (config.heal_steps if arm.layers else 0)
                model = build_model(config, depth, seed)
                history = train_lm(model, train_tokens, config, steps, lr, seed,
                                   arm.regularizer, weight)
                candidate = {"lr": lr, "weight": weight, "history": history,
                             "unpruned": {"val": bits_per_byte(model, windows.val),
                                          "test": bits_per_byte(model, windows.test)}}
                if arm.layers:
                    candidate["score"] = candidate["unpruned"]["val"]
                else:
                    candidate["cuts"] = _cuts(model, config, corpus, windows, seed,
                                              [SELECTION_FRACTION], ("finetune",), None,
                                              heal_best_only=True)
                    candidate["score"] = _selection_score(candidate["cuts"])
                candidates.append((candidate, model))
                progress(f"seed {seed} {arm.name} lr {lr:g} weight {weight:g}: val bpb "
                         f"{candidate['unpruned']['val']:.3f}, score {candidate['score']:.3f} "
                         f"({time.process_time() / config.threads:.0f} CPU s per thread)")
        best, model = min(candidates, key=lambda pair: pair[0]["score"])
        if not arm.layers:  # the chosen model's remaining budgets and distillation
            more = _cuts(model, config, corpus, windows, seed, REMOVED_FRACTIONS, HEALINGS,
                         teacher=model, done=best["cuts"])
            best["cuts"] = more
            best["best_rule"] = {f"{f:g}": min(RULES, key=lambda r: more[f"{f:g}/{r}"]
                                               ["finetune"]["val"]) for f in REMOVED_FRACTIONS}
            best["flow"] = flow(model, windows.test[:32])
        chosen_models[arm.name] = (model, best)
        record["arms"][arm.name] = {
            "chosen": {k: v for k, v in best.items() if k != "cuts"} | {
                "cuts": _public(best.get("cuts", {}))},
            "candidates": [{k: v for k, v in c.items() if k not in ("cuts", "history")}
                           | {"cuts": _public(c.get("cuts", {}))} for c, _ in candidates],
            "seconds": time.perf_counter() - started}
    record["generate_tokens_per_s"] = _throughput(config, chosen_models, windows)
    return record


def _public(cuts: Dict[str, dict]) -> Dict[str, dict]:
    return {key: {k: v for k, v in entry.items() if k != "_models"}
            for key, entry in cuts.items()}


def _throughput(config: LMConfig, chosen, windows: Windows) -> Dict[str, float]:
    """Greedy tokens/s of the FFR arm's unpruned model and its fine-tuned pruned models."""
    model, best = chosen["ffr"]
    prompt = windows.test[:1, :16]
    speeds = {str(config.layers): tokens_per_second(model, prompt, config.generate_tokens)}
    for fraction in REMOVED_FRACTIONS:
        entry = best["cuts"][f"{fraction:g}/{best['best_rule'][f'{fraction:g}']}"]
        pruned = entry["_models"]["finetune"]
        speeds[str(pruned.config.num_hidden_layers)] = tokens_per_second(
            pruned, prompt, config.generate_tokens)
    return speeds


# --- several seeds ----------------------------------------------------------------------

def _settings(config: LMConfig, corpus: Corpus) -> dict:
    return {"config": asdict(config), "corpus": corpus.describe(),
            "torch": torch.__version__, "transformers": _transformers().__version__}


def run(config: LMConfig, out: Optional[str] = None, seeds: Sequence[int] = (0,),
        progress: bool = True) -> dict:
    """Each seed in `seeds` (a seed whose JSON in `out` was written with the same settings
    and corpus is read back, not rerun), then the table and figures over them."""
    check_config(config)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError("--seed needs at least one seed, each once")
    out = Path(out or "results/demo-lm")
    corpus = load_corpus(config.data, config.data_root)
    check_corpus(corpus, config.window)
    settings = json.loads(json.dumps(_settings(config, corpus)))
    say = print if progress else (lambda *_: None)
    records = []
    for seed in seeds:
        path = out / SEED_FILENAME.format(seed)
        if path.exists():
            stored = json.loads(path.read_text())
            if stored.get("settings") == settings:
                say(f"seed {seed}: read back from {path} (same settings and corpus)")
                records.append(stored)
                continue
        started, cpu_started = time.perf_counter(), time.process_time()
        record = run_seed(config, corpus, seed, say)
        record["settings"] = settings
        record["seconds"] = time.perf_counter() - started
        # the CPU time over the threads: the wall time on cores nothing else shares
        record["cpu_seconds_per_thread"] = (time.process_time() - cpu_started) / config.threads
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_json(path, record)
        records.append(record)
    return report(config, records, out)


def _show(spread: Spread) -> str:
    return f"{spread.mean:.3f} ± {spread.std:.3f}"


def summarize(config: LMConfig, records: Sequence[dict]) -> List[dict]:
    """Per arm and depth, the test bits per byte over the seeds: unpruned, and for the
    pruned arms the best rule's (per seed, on validation) straight after removal, after
    fine-tune healing and after distillation healing."""
    rows = []
    for arm in arms(config):
        chosen = [r["arms"][arm.name]["chosen"] for r in records]
        base = {"arm": arm.name, "label": arm.label, "lr": [c["lr"] for c in chosen],
                "weight": [c["weight"] for c in chosen]}
        if arm.layers:
            rows.append(base | {"layers": arm.layers, "rule": [None] * len(chosen),
                                "unpruned": Spread.of([c["unpruned"]["test"] for c in chosen])})
            continue
        rows.append(base | {"layers": config.layers, "rule": [None] * len(chosen),
                            "unpruned": Spread.of([c["unpruned"]["test"] for c in chosen])})
        for fraction in REMOVED_FRACTIONS:
            key = f"{fraction:g}"
            rules = [c["best_rule"][key] for c in chosen]
            entries = [c["cuts"][f"{key}/{rule}"] for c, rule in zip(chosen, rules)]
            rows.append(base | {"layers": config.layers - removed_count(config.layers, fraction),
                                "rule": rules,
                                **{stage: Spread.of([e[stage]["test"] for e in entries])
                                   for stage in ("pruned", *HEALINGS)}})
    return rows


def _best_after_healing(row: dict) -> Spread:
    return min((row[h] for h in HEALINGS), key=lambda s: s.mean)


def comparisons(rows: Sequence[dict]) -> List[str]:
    """FFR pruned against the scratch model of its depth and the unregularized model pruned,
    each in test bits per byte after its better healing, within the spread or not."""
    by = {(row["arm"], row["layers"]): row for row in rows}
    lines = []
    for (arm, layers), row in by.items():
        if arm != "ffr" or "pruned" not in row:
            continue
        ours = _best_after_healing(row)
        for other_arm in ("none", "layerdrop", f"scratch{layers}"):
            other = by.get((other_arm, layers))
            if other is None:
                continue
            theirs = _best_after_healing(other) if "pruned" in other else other["unpruned"]
            verdict = "one seed: no spread to judge by" if ours.n < 2 else (
                "within the spread") if within_spread(ours, theirs) else (
                "FFR ahead" if ours.mean < theirs.mean else f"{other_arm} ahead")
            lines.append(f"{layers} layers kept, FFR - {other_arm}: "
                         f"{ours.mean - theirs.mean:+.3f} bits per byte ({verdict})")
    return lines


def _table_rows(rows: Sequence[dict]) -> List[dict]:
    def choice(values):
        shown = sorted(set(map(str, values)))
        return "/".join(shown)

    table = []
    for row in rows:
        healed = "pruned" in row
        table.append({
            "arm": row["label"], "layers kept": row["layers"], "lr": choice(row["lr"]),
            "weight": choice(row["weight"]) if row["arm"] in ("ffr", "layerdrop") else "-",
            "best rule": choice(row["rule"]) if healed else "-",
            "trained (unpruned)": _show(row["unpruned"]) if "unpruned" in row else "-",
            "after removal": _show(row["pruned"]) if healed else "-",
            "fine-tune healed": _show(row["finetune"]) if healed else "-",
            "distilled": _show(row["distill"]) if healed else "-"})
    return table


def report(config: LMConfig, records: Sequence[dict], out: Path) -> dict:
    rows = summarize(config, records)
    seeds = [r["seed"] for r in records]
    speeds = {depth: statistics.fmean(r["generate_tokens_per_s"][depth] for r in records)
              for depth in records[0]["generate_tokens_per_s"]}
    corpus = records[0]["settings"]["corpus"]
    lines = [
        f"# demo-lm: byte-level LlamaForCausalLM, {config.layers} layers, width {config.hidden}",
        "",
        f"Corpus: {config.data} ({corpus['bytes']['train']:,} / {corpus['bytes']['val']:,} / "
        f"{corpus['bytes']['test']:,} bytes train / val / test, sha256 {corpus['sha256'][:16]}); "
        f"{config.steps} training steps of {config.batch_size} x {config.window} bytes, "
        f"{config.heal_steps} healing steps (lr {config.heal_lr:g}); seeds "
        f"{', '.join(map(str, seeds))}; {config.threads} torch threads.",
        "Test bits per byte (lower is better), mean ± sd over the seeds; learning rate, "
        "weight and rule chosen on validation (module docstring of ffr_fast/study/lm.py).",
        "", markdown_table(_table_rows(rows)), "",
        *[f"- {line}" for line in comparisons(rows)], "",
        "Greedy generate() tokens/s (batch 1, FFR arm): "
        + ", ".join(f"{depth} layers {speed:.0f}" for depth, speed in speeds.items()),
        "", "Seconds per seed, wall (CPU per thread): " + ", ".join(
            f"{r['seconds']:.0f} ({r['cpu_seconds_per_thread']:.0f})" for r in records), ""]
    table = "\n".join(lines)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    summary = {"seeds": seeds, "rows": [_jsonable(row) for row in rows],
               "comparisons": comparisons(rows), "generate_tokens_per_s": speeds,
               "table": table}
    checkpoint.atomic_write_json(out / "summary.json", summary)
    frontier_plot(rows, out / "frontier.png", config.layers)
    plots.flow({config_label: [r["arms"][name]["chosen"]["flow"] for r in records]
                for name, config_label in (("none", "no regularizer"), ("ffr", "FFR"),
                                           ("layerdrop", "LayerDrop"))},
               out / "flow.png", f"LlamaForCausalLM, {config.layers} layers")
    return summary


def _jsonable(row: dict) -> dict:
    return {k: asdict(v) if isinstance(v, Spread) else v for k, v in row.items()}


def frontier_plot(rows: Sequence[dict], path, layers: int) -> Path:
    """Test bits per byte against decoder layers kept: each arm unpruned, then pruned by its
    best rule after fine-tune healing (left) and after distillation (right); the scratch
    models at their depths in both panels. Error bars: one sd over the seeds."""
    figure, axes = plots._subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, healing in zip(axes, HEALINGS):
        for index, arm in enumerate(("none", "ffr", "layerdrop")):
            mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["layers"])
            values = [r[healing] if "pruned" in r else r["unpruned"] for r in mine]
            ax.errorbar([r["layers"] for r in mine], [v.mean for v in values],
                        yerr=[v.std for v in values], marker="o", capsize=3,
                        label=mine[0]["label"], color=f"C{index}")
        scratch = sorted((r for r in rows if r["arm"].startswith("scratch")),
                         key=lambda r: r["layers"])
        ax.errorbar([r["layers"] for r in scratch], [r["unpruned"].mean for r in scratch],
                    yerr=[r["unpruned"].std for r in scratch], marker="s", linestyle="none",
                    capsize=3, color="black", label="trained from scratch at that depth")
        healed = "fine-tuned" if healing == "finetune" else "distilled"
        ax.set_title(f"pruned (best rule), then {healed}", fontsize=10)
        ax.set_xlabel(f"decoder layers kept (of {layers})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test bits per byte (mean over seeds)")
    axes[0].legend(fontsize=8)
    return plots._save(figure, path)
