"""Import torchvision beside a CPU-only torch build.

torchvision's Linux wheels link their C++ detection ops (nms, roi_align, ...) against
torch's CUDA libraries. Beside a CPU-only torch those ops fail to load, which torchvision
tolerates, except that version 0.28 then registers fake kernels for `torchvision::nms` and
`torchvision::qnms` without checking, and its import fails with "operator torchvision::nms
does not exist". ffr_fast uses torchvision's models only, never those ops, so when (and only
when) that happens we declare the two schemas (so the registration finds them) and import
again. Calling one of those ops then raises torch's "no kernel" error, which is the truth.
"""
import importlib
import sys
import types

import torch

_MISSING_OPS = ("nms", "qnms")
_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
_library = None  # keeps the declared schemas alive for the process


def load_torchvision() -> types.ModuleType:
    """torchvision, imported (see the module docstring for the one case handled)."""
    global _library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as error:
        if "torchvision::nms" not in str(error) or _library is not None:
            raise
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import left half-initialised modules
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for op in _MISSING_OPS:
        _library.define(op + _SCHEMA)
    return importlib.import_module("torchvision")
