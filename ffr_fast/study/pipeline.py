"""The steps of the story that the CLI, the demo and the sweep share: build a seeded model,
train it with a regularizer, cut it to a FLOPs budget by one of two removal rules,
recalibrate its BatchNorm statistics, fine-tune it, and measure what training left behind
(structured sparsity, the feature flow).

The removal rules (REMOVALS):
  "threshold"  the pruner's own search (ffr_fast.prune(flops_target=...)): every channel and
               every residual branch whose importance (L2 norm of its filter, BatchNorm
               folded in) is at most a threshold, the threshold searched for the budget;
  "influence"  ShortGPT's depth pruning: the residual branches with the lowest Block
               Influence, 1 - cos(x_in, x_out) measured on training images, are removed
               (ffr_fast.prune(remove_branches=...)) until the budget is met.
After either, every model gets its BatchNorm statistics recomputed on training batches
(ffr_fast.recalibrate_bn; a LayerNorm model has none to recompute) before it is scored:
without that step the scores straight after pruning measure stale statistics, not pruning.
"""
import warnings
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from ffr_fast import metrics, models
from ffr_fast.flow.stream import residual_blocks
from ffr_fast.pruning import FlopsTargetWarning, prune, recalibrate_bn, residual_branches
from ffr_fast.study import data, train

# A filter or BatchNorm scale counts as "zero" below this magnitude (stated in every table).
SPARSITY_THRESHOLD = 1e-2
REMOVALS = ("threshold", "influence")
RECALIBRATION_BATCHES = 20  # training batches (of the recipe's size) for BN statistics
INFLUENCE_IMAGES = 256  # training images Block Influence is measured on


@dataclass
class Trained:
    """One trained model and what training left in it (before any removal)."""
    config: train.TrainConfig
    history: List[dict]
    accuracy: Dict[str, float]  # per split scored
    sparsity: dict
    flow: Dict[str, Optional[float]]  # per residual block: mean ||x_out - x_in|| / ||x_in||
    model: nn.Module = field(repr=False)


@dataclass
class Cut:
    """A trained model cut to a FLOPs budget by a removal rule, then fine-tuned."""
    removal: str
    keep: float  # the budget asked, as the share of the FLOPs kept
    flops_kept: float  # the share reached (at most `keep`)
    flops: int  # per image
    params: int
    branches_removed: List[str]
    channels: dict  # layer -> (before, after), from the prune report
    pruned: Dict[str, float]  # accuracy per split straight after removal (BN recalibrated)
    finetuned: Dict[str, float]  # accuracy per split after the short fine-tuning
    finetune_history: List[dict]
    model: nn.Module = field(repr=False)


@dataclass
class CutScores:
    """One method on one seed at one budget, as numbers on one split: the accuracy trained,
    straight after removal (BatchNorm recalibrated) and fine-tuned, and what the cut reached.
    The demo's per-seed results and the sweep's points extend it."""
    method: str
    seed: int
    keep: float
    trained: float
    pruned: float
    finetuned: float
    flops_kept: float
    branches_removed: int

    @classmethod
    def of(cls, method: str, trained: Trained, cut: Cut, split: str, **extra):
        """The scores on `split` of `cut` (made from `trained`); `extra`: a subclass's
        fields."""
        return cls(method=method, seed=trained.config.seed, keep=cut.keep,
                   trained=trained.accuracy[split], pruned=cut.pruned[split],
                   finetuned=cut.finetuned[split], flops_kept=cut.flops_kept,
                   branches_removed=len(cut.branches_removed), **extra)


def load_splits(config) -> "data.Splits":
    """The data a config trains on, split by its split_seed."""
    return data.load(config.data, config.data_root, config.split_seed, config.image_size)


def seeded_model(config, splits) -> nn.Module:
    """The config's zoo model for the data, initialised from the config's seed; a model that
    cannot take the data's images (VGG's five poolings on 16x16 digits, a ViT built for
    another size) is refused here, before any training."""
    torch.manual_seed(config.seed)
    model = models.create(config.model, splits.num_classes, splits.in_channels)
    model.eval()
    try:  # a shape probe: zeros draw nothing from the generator the training run uses
        with torch.no_grad():
            model(torch.zeros(1, *splits.input_shape))
    except (RuntimeError, AssertionError, ValueError) as error:
        raise ValueError(f"model {config.model!r} cannot take {config.data} images of shape "
                         f"{splits.input_shape}: {error}") from error
    return model.train()


def example_inputs(splits, batch_size: int = 1):
    return (torch.randn(batch_size, *splits.input_shape),)


def training_images(splits, count: int, seed: int) -> torch.Tensor:
    """`count` training images drawn with `seed` (Block Influence is measured on them)."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randperm(len(splits.train), generator=generator)[:count]
    return torch.stack([splits.train[int(i)][0] for i in indices])


def score(model: nn.Module, splits, config, names=data.EVALUATION_SPLITS) -> Dict[str, float]:
    """Accuracy on each split in `names` (config.max_batches, for smoke runs, limits it)."""
    return {name: train.evaluate(model, getattr(splits, name), config.batch_size,
                                 max_batches=config.max_batches)["accuracy"]
            for name in names}


def train_model(config, splits, names=data.EVALUATION_SPLITS, progress: bool = True) -> Trained:
    """Train the config's seeded model with its regularizer and measure the result."""
    result = _uninterrupted(train.fit(seeded_model(config, splits), splits, config,
                                      progress=progress))
    model = result.model.eval()
    return Trained(config, result.history, score(model, splits, config, names),
                   structured_sparsity(model),
                   feature_flow(model, splits.test, max_batches=config.max_batches), model)


def cut(trained: Trained, splits, removal: str, keep: float, finetune: train.TrainConfig,
        importance: str = "l2", names=data.EVALUATION_SPLITS, progress: bool = True) -> Cut:
    """Cut `trained` to `keep` of its FLOPs by `removal` (REMOVALS), recalibrate its
    BatchNorm statistics, score it, fine-tune it with `finetune`, score it again."""
    config = trained.config
    inputs = example_inputs(splits)
    if removal == "threshold":
        with warnings.catch_warnings():  # a search that lands below the tolerance warns;
            warnings.simplefilter("ignore", FlopsTargetWarning)  # Cut reports what it kept
            result = prune(trained.model, inputs, flops_target=keep, importance=importance)
    elif removal == "influence":
        images = training_images(splits, INFLUENCE_IMAGES, config.seed)
        result = prune(trained.model, inputs,
                       remove_branches=influence_removal(trained.model, images, keep))
    else:
        raise ValueError(f"removal must be one of {REMOVALS}, got {removal!r}")
    recalibrate(result.model, splits, config)
    after_removal = score(result.model, splits, config, names)
    tuned = _uninterrupted(train.fit(result.model, splits, finetune, progress=progress))
    model = tuned.model.eval()
    flops = metrics.count_flops(model, inputs)
    report = result.report
    return Cut(removal, keep, flops / metrics.count_flops(trained.model, inputs), flops,
               metrics.count_params(model), [b["block"] for b in report.removed_blocks],
               dict(report.channels), after_removal, score(model, splits, config, names),
               tuned.history, model)


def influence_removal(model: nn.Module, images: torch.Tensor, keep: float) -> List[str]:
    """ShortGPT's rule: the names of the residual branches with the lowest Block Influence on
    `images`, fewest first, just enough for the branches' FLOPs to leave at most `keep` of
    the model's. Branches, not whole blocks (a transformer layer's attention and MLP apart):
    finer steps land nearer the budget. Raises when removing every branch still keeps more
    than `keep`."""
    if not 0 < keep < 1:
        raise ValueError(f"the FLOPs budget is a fraction of the original in (0, 1), got {keep}")
    total = metrics.count_flops(model, (images,))
    must_save = (1 - keep) * total
    chosen, saved = [], 0
    for branch in sorted(residual_branches(model, (images,), unit="branch"),
                         key=lambda b: b.influence):
        if saved >= must_save:
            break
        chosen.append(branch.name)
        saved += branch.flops
    if saved < must_save:
        raise ValueError(f"removing every residual branch keeps {1 - saved / total:.1%} of "
                         f"the FLOPs; Block Influence removal cannot reach {keep:.0%}")
    return chosen


def recalibrate(model: nn.Module, splits, config) -> int:
    """Recompute `model`'s BatchNorm statistics on RECALIBRATION_BATCHES training batches
    (drawn with the config's seed); returns the batches used (0 without BatchNorm)."""
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(splits.train, batch_size=config.batch_size, shuffle=True,
                        generator=generator)
    return recalibrate_bn(model, loader, max_batches=min(
        RECALIBRATION_BATCHES, config.max_batches or RECALIBRATION_BATCHES))


def finetune_config(config: train.TrainConfig, epochs: int, lr: float) -> train.TrainConfig:
    """The short fine-tuning every cut model gets: the recipe, no regularizer."""
    return replace(config, epochs=epochs, lr=lr, regularizer="none", weight=0.0)


def _uninterrupted(result):
    if result.interrupted:  # fit() returns on Ctrl-C; a pipeline stops there
        raise KeyboardInterrupt
    return result


@torch.no_grad()
def feature_flow(model: nn.Module, dataset, batch_size: int = 256,
                 max_batches: Optional[int] = None) -> Dict[str, Optional[float]]:
    """Per residual block (ffr_fast.flow.stream.residual_blocks, in forward order), the
    feature flow's step ||x_out - x_in|| / ||x_in|| (per image, features flattened) averaged
    over `dataset`: how far each block moves the stream, the quantity FFR's gradient term
    shrinks. None for a block whose output shape differs from its input's."""
    names = residual_blocks(model, (dataset[0][0].unsqueeze(0),))
    sums = dict.fromkeys(names, 0.0)
    shape_changing = set()

    def hook(name):
        def measure(block, inputs, output):
            x_in, x_out = inputs[0].flatten(1).float(), output.flatten(1).float()
            if x_in.shape != x_out.shape:
                shape_changing.add(name)
                return
            step = (x_out - x_in).norm(dim=1) / x_in.norm(dim=1).clamp_min(1e-12)
            sums[name] += float(step.sum())
        return measure

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    was_training, count = model.training, 0
    model.eval()
    try:
        for step, (images, _) in enumerate(DataLoader(dataset, batch_size=batch_size)):
            if max_batches is not None and step >= max_batches:
                break
            model(images)
            count += len(images)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {name: None if name in shape_changing else sums[name] / max(count, 1)
            for name in names}


def structured_sparsity(model: nn.Module, threshold: float = SPARSITY_THRESHOLD) -> dict:
    """Share of conv/linear filters whose L2 norm is <= `threshold`, and share of BatchNorm
    scales |gamma| <= it, over the whole model."""
    scales = [gamma.detach().abs() for gamma in metrics.batchnorm_scales(model).values()]
    below = float((torch.cat(scales) <= threshold).float().mean()) if scales else 0.0
    return {"filters_below": metrics.filter_sparsity(model, threshold),
            "bn_scales_below": below, "threshold": threshold}


def filter_norms(model: nn.Module) -> dict:
    """Per conv layer (by module name), the L2 norms of its filters: for the plots."""
    return {name: module.weight.detach().flatten(1).norm(dim=1).tolist()
            for name, module in model.named_modules() if isinstance(module, nn.Conv2d)}


def bn_scales(model: nn.Module) -> dict:
    """Per BatchNorm layer (by module name), its scales |gamma|: for the plots."""
    return {name: gamma.detach().abs().tolist()
            for name, gamma in metrics.batchnorm_scales(model).items()}
