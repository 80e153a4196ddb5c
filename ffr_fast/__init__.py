"""ffr_fast: Feature Flow Regularization with fused kernels, and a pruner that turns the
structured sparsity it creates into a smaller, faster model."""
import importlib

__version__ = "0.1.0"

# Public names and the module that defines each; imported on first use so that
# `import ffr_fast` stays cheap (no plotting or tracing machinery at import time).
_EXPORTS = {
    "flow_penalty": "ffr_fast.flow.penalty",
    "flow_penalty_chains": "ffr_fast.flow.penalty",
    "FFRLoss": "ffr_fast.flow.loss",
    "prune": "ffr_fast.pruning",
    "PruneResult": "ffr_fast.pruning",
    "save_pruned": "ffr_fast.pruning",
    "load_pruned": "ffr_fast.pruning",
    "recalibrate_bn": "ffr_fast.pruning",
    "residual_branches": "ffr_fast.pruning",
    "register_rule": "ffr_fast.pruning",
    "measure_latency": "ffr_fast.metrics",
    "models": "ffr_fast.models",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ffr_fast' has no attribute {name!r}")
    module = importlib.import_module(_EXPORTS[name])
    return module if name == "models" else getattr(module, name)
