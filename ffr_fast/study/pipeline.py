"""The steps of the story that the CLI, the demo and the sweep share: build a seeded model,
prune it to a FLOPs budget, measure the structured sparsity training left behind."""
from dataclasses import replace

import torch
from torch import nn

from ffr_fast import metrics, models
from ffr_fast.study import data, train

# A filter or BatchNorm scale counts as "zero" below this magnitude (stated in every table).
SPARSITY_THRESHOLD = 1e-2


def run_arm(config, splits, keep_levels=(0.5,), finetune_epochs: int = 4,
            finetune_lr: float = 0.01, importance: str = "l2",
            splits_to_score=("val", "test"), progress: bool = True) -> dict:
    """Train one arm from its config, then for each FLOPs budget in `keep_levels` prune a
    copy of it with `importance` and fine-tune that briefly without a regularizer.

    Returns accuracies on `splits_to_score` after training, pruning and fine-tuning, the
    histories, the sparsity training left, the prune reports and the models themselves."""
    def score(model):  # config.max_batches (smoke runs) limits scoring too
        return {name: train.evaluate(model, getattr(splits, name), config.batch_size,
                                     max_batches=config.max_batches)["accuracy"]
                for name in splits_to_score}

    result = _uninterrupted(train.fit(seeded_model(config, splits), splits, config,
                                      progress=progress))
    trained = result.model.eval()
    arm = {"config": train.config_dict(config), "history": result.history,
           "trained": score(trained), "sparsity": structured_sparsity(trained),
           "filter_norms": filter_norms(trained), "bn_scales": bn_scales(trained),
           "model": trained, "budgets": {}}
    finetune = replace(config, epochs=finetune_epochs, lr=finetune_lr, regularizer="none",
                       weight=0.0)
    for keep in keep_levels:
        pruned = prune_to_flops(trained, example_inputs(splits), keep, importance)
        after_pruning = score(pruned.model)
        tuned = _uninterrupted(train.fit(pruned.model, splits, finetune, progress=progress))
        arm["budgets"][keep] = {
            "pruned": after_pruning, "finetuned": score(tuned.model.eval()),
            "finetune_history": tuned.history, "report": pruned.report.to_dict(),
            "model": tuned.model}
    return arm


def _uninterrupted(result):
    if result.interrupted:  # fit() returns on Ctrl-C; a pipeline stops there
        raise KeyboardInterrupt
    return result


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


def prune_to_flops(model: nn.Module, inputs, keep: float, importance: str = "l2",
                   criterion: str = "threshold", scope: str = "global",
                   tolerance: float = 0.02, iterations: int = 16, **options):
    """Prune `model` to keep between keep - tolerance and keep of its FLOPs: the library's
    FLOPs budget (prune(flops_target=...)), searching the pruner's `criterion` ("threshold"
    or "ratio") in at most `iterations` prunings. A budget the search cannot land on is a
    FlopsTargetWarning and is written in the report's `warnings`."""
    from ffr_fast.pruning import prune

    return prune(model, inputs, flops_target=keep, flops_search=criterion,
                 flops_tolerance=tolerance, flops_search_steps=iterations,
                 importance=importance, scope=scope, **options)


def flops_kept(report) -> float:
    facts = report.to_dict()
    return facts["flops_after"] / facts["flops_before"]


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
