"""A *Study*: one capture of a model on the example call (capture.py), analysed into channel
classes (aten.py) with the channels of every ignored module pinned, and scored
(aten_importance.py, or a callable importance through aten_scorer.py); with the model's
output and FLOPs, which every candidate cut is verified and counted against. Every candidate
of a FLOPs search plans on the same study.
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple, Union

from torch import nn

from ..capture import Capture, UncapturableModelError, capture, flat_tensors
from ..modes import run_evaluating
from . import depth
from .aten import Analysis, analyze
from .aten_importance import Emitter, class_scores, emitters
from .aten_liveness import dead_classes
from .aten_scorer import scorer_emitters
from .importance import Scorer
from .inputs import run_checked
from .multihead import capturing_head_pruned
from .slicing import rms_norm_paths


@dataclass
class Study:
    """One capture of a model, analysed and scored once."""
    model: nn.Module
    args: tuple
    kwargs: dict
    capture: Capture
    analysis: Analysis
    emitters: List[Emitter]
    scores: Dict[int, float]  # channel class root -> importance
    dead: Set[int]  # class roots the output never sees (aten_liveness.py), scored 0
    output: object  # the model's output on the example call, eval mode
    flops: int  # and its FLOPs
    training: bool  # captured in training mode
    free_outputs: Dict[str, str]  # output node -> its field: outputs that may narrow
    opaque: Tuple[str, ...]  # the modules captured as one op each (_capture)


def study(model: nn.Module, args, kwargs: dict, importance: Union[str, Scorer],
          ignored: Sequence[str], training: bool = False,
          opaque: Optional[Sequence[str]] = None) -> Study:
    """The model captured on the example call, its channel classes (the channels of every
    module in `ignored` pinned) and their scores; its output and FLOPs (what every candidate
    cut of the model is measured against). The capture runs, in every nn.MultiheadAttention,
    the forward it runs once cut (multihead.capturing_head_pruned); with `training`, the
    training-mode forward (capture.py), so that code only training runs is cut too. `opaque`:
    the modules to capture as one op each, where an earlier study of the model found them
    (None: found as _capture says)."""
    # the example run first: inputs the model cannot run are named as such (ExampleInputError,
    # with the module and the shapes), not as a capture failure
    output, flops = run_checked(model, args, lambda *a: run_evaluating(model, a, kwargs))
    with capturing_head_pruned(model):
        cap, opaque = _capture(model, args, kwargs, ignored, training) if opaque is None \
            else (capture(model, args, kwargs, training=training, opaque=opaque), opaque)
    free = side_hidden_states(cap, output)
    analysis = analyze(cap, rms_norm_paths(model), set(free))
    _pin_ignored(analysis, cap, ignored)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    found = emitters(analysis, cap, tensors, importance) if isinstance(importance, str) \
        else scorer_emitters(analysis, cap, model, tensors, importance)
    scores = class_scores(analysis, found)
    dead = dead_classes(analysis, cap, tensors)
    scores.update((root, 0.0) for root in dead if root in scores)
    return Study(model, tuple(args), kwargs, cap, analysis, found, scores, dead, output, flops,
                 training, free, tuple(opaque))


def side_hidden_states(cap: Capture, output) -> Dict[str, str]:
    """The outputs whose channels a cut may narrow (node name -> field): the hidden states a
    Hugging Face ModelOutput hands out beside its first field (T5's
    `encoder_last_hidden_state` beside its logits), which would otherwise pin the whole
    residual stream, as Torch-Pruning narrows them too. The first field (the logits, a
    `last_hidden_state`) and every output of any other kind pin theirs."""
    fields = list(cap.output_names.items())
    if not (isinstance(output, dict) and hasattr(output, "to_tuple")) or not fields \
            or len(flat_tensors(output)) != len(fields):
        return {}
    first = fields[0][1].split(".")[0]
    return {node: field for node, field in fields[1:] if field.split(".")[0] != first
            and field.split(".")[0].endswith(("hidden_state", "hidden_states"))}


def _capture(model: nn.Module, args, kwargs: dict, ignored: Sequence[str], training: bool
             ) -> Tuple[Capture, Sequence[str]]:
    """The capture of the study, and the modules it holds as one op each. Where export
    fails, a module export cannot capture may be one the caller keeps whole: then each
    ignored module runs as one op the capture does not look into; without any, the error
    names the module to ignore."""
    try:
        return capture(model, args, kwargs, training=training), ()
    except UncapturableModelError as error:
        if ignored:
            return capture(model, args, kwargs, training=training, opaque=ignored), ignored
        if not error.module:
            raise
        hinted = UncapturableModelError(
            f"{error}. prune(ignored=['{error.module}']) keeps that module whole and "
            "captures it as one op, unseen inside")
        hinted.module = error.module
        raise hinted from error


def _pin_ignored(analysis: Analysis, cap: Capture, ignored: Sequence[str]) -> None:
    """Keep every channel a module of `ignored` holds, reads or writes (what the torch.fx
    path does by tracing it as a leaf)."""
    if not ignored:
        return
    reason = "read or written by an ignored module"
    for name, ids in analysis.tensors.items():
        if depth.inside(name.rpartition(".")[0], ignored):
            for dim in ids:
                analysis.cg.pin(dim, reason)
    for node in cap.graph.nodes:
        if not any(depth.inside(cap.calls[call].path, ignored) for call in cap.call_stack(node)):
            continue
        for value in [analysis.values.get(node.name)] + [
                analysis.values.get(arg.name) for arg in node.all_input_nodes]:
            for ids in (value if isinstance(value, list) else []):
                analysis.cg.pin(ids, reason)


def exact_emitters(work: Study) -> List[Emitter]:
    """The studied model's emitters in the "l2" unit, where a channel scores 0 only if it
    emits exactly zero: what a block is judged by without a threshold, whatever
    `importance` ranks channels by (a zero |gamma| under "bn" may still shift its channel)."""
    tensors = dict(work.model.named_parameters(remove_duplicate=False))
    tensors.update(work.model.named_buffers(remove_duplicate=False))
    return emitters(work.analysis, work.capture, tensors, "l2")
