"""The block step of prune() on torch.export's capture: which residual branches leave (named
in `remove_branches`, and with `remove_blocks` those whose tails emit at most a limit: a
whole block where all its branches do, else each branch that can leave alone), and the
model without them, verified by depth.py.

A FLOPs search on the threshold asks for several choices of blocks in turn (a higher
threshold removes more blocks), so `BlockSteps` holds one choice at a time: its model
without those blocks and that model's study. A new choice lets the last one go, so that one
copy of the model is held, not one per step of the search.
"""
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from . import depth
from .aten_branches import block_score, emitted
from .aten_importance import Emitter
from .aten_study import Study, study
from .report import PruneReport
from .sub_branches import Removal


class NotABlockError(ValueError):
    """remove_branches names what is no removable residual branch of the capture."""


@dataclass
class BlockChoice:
    """The removable branches (forward order: depth.removals) with their scores, and the rule
    that picks them: the `named` ones always, with `by_score` also those scoring at most a
    limit (a branch inside a block that goes with it is not picked again)."""
    scores: Dict[str, Optional[float]]  # None: nothing scores the branch
    named: Tuple[str, ...]
    by_score: bool
    removals: Dict[str, Removal] = field(default_factory=dict)

    def at(self, limit: float) -> Tuple[str, ...]:
        """The branches chosen under `limit`, in forward order."""
        order = list(self.scores)
        chosen = list(self.named)
        for name, score in self.scores.items():
            if self.by_score and name not in chosen and score is not None and score <= limit \
                    and not depth.inside(name, chosen):
                chosen = [c for c in chosen if not depth.inside(c, [name])] + [name]
        return tuple(sorted(chosen, key=order.index))

    def replaced(self, names: Sequence[str]) -> List[dict]:
        """save_pruned's records of the stand-ins among the branches `names`."""
        return [self.removals[n].record() for n in names if self.removals[n].kind != "block"]


def choose_blocks(first: Study, ignored: Sequence[str], scored: List[Emitter],
                  remove_branches: Sequence[str], remove_blocks: bool) -> BlockChoice:
    """Every branch depth.py can remove from the studied model (outside `ignored`): a block
    scored by the largest that its branches' tails emit into the stream by the emitters
    `scored`, a branch alone by what its tail emits; NotABlockError if `remove_branches`
    names anything else."""
    found = {r.name: r for r in depth.removals(first.model, first.capture)
             if not depth.inside(r.name, ignored)} if remove_branches or remove_blocks else {}
    scores = {name: block_score(first.capture, first.analysis, scored, name)
              if r.kind == "block" else emitted(first.capture, first.analysis, scored,
                                                first.capture.nodes[r.branch])
              for name, r in found.items()}
    unknown = [name for name in remove_branches if name not in scores]
    if unknown:
        raise NotABlockError(f"remove_branches: no residual branch named {unknown}; the "
                             f"model's branches are {list(scores)}")
    return BlockChoice(scores, tuple(remove_branches), bool(remove_blocks), found)


@dataclass
class BlockStep:
    """The model without the blocks `removed` (the model itself when none are), with the
    report of their removal (None when none are) and what the step has to say."""
    removed: Tuple[str, ...]
    model: nn.Module
    report: Optional[PruneReport]
    notes: List[str] = field(default_factory=list)


class BlockSteps:
    """The blocks of a choice removed from `model`, one choice held at a time (module
    docstring), and the study of the model without them."""

    def __init__(self, model: nn.Module, inputs, kwargs: dict, choice: BlockChoice,
                 first: Study, importance, ignored: Sequence[str]):
        self.model, self.inputs, self.kwargs, self.choice = model, inputs, kwargs, choice
        self.first, self.importance, self.ignored = first, importance, ignored
        self._step: Optional[Tuple[tuple, BlockStep]] = None  # ((chosen, in_place), step)
        self._study: Optional[Study] = None  # of the held step's model

    def without(self, chosen: Tuple[str, ...], in_place: bool) -> BlockStep:
        """The model without the blocks `chosen`, verified: a copy, or with `in_place` the
        model itself. A block the scores chose that is no identity when removed stays, and
        the step says so; one the caller named fails the call."""
        key = (chosen, in_place)
        if self._step is None or self._step[0] != key:
            self._step, self._study = None, None  # the last choice goes first
            self._step = (key, self._remove(chosen, in_place))
        return self._step[1]

    def study(self, step: BlockStep) -> Study:
        """The study of `step`'s model (the first study when no block was removed); a model
        changed in place since is studied again."""
        if not step.removed:
            return self.first
        if self._study is None or self._study.model is not step.model:
            self._study = study(step.model, self.inputs, self.kwargs, self.importance,
                                self.ignored, self.first.training, self.first.opaque)
        return self._study

    def studied(self, removed: Tuple[str, ...]) -> Optional[Study]:
        """The study held of a model without the blocks `removed` (the first study when none
        are), or None when the held choice is another one."""
        if not removed:
            return self.first
        held = self._study is not None and self._step[1].removed == removed
        return self._study if held else None

    def _remove(self, chosen: Tuple[str, ...], in_place: bool) -> BlockStep:
        if not chosen:
            return BlockStep((), self.model, None)
        removable = self.choice.removals
        try:
            return BlockStep(chosen, *depth.remove(self.model, self.inputs, self.kwargs,
                                                   chosen, removable, in_place))
        except ValueError as error:  # a block the scores chose is no identity
            scored = [b for b in chosen if b not in self.choice.named]
            if not scored:
                raise
            note = f"the blocks {scored} score at most the threshold but stay: {error}"
        named = self.choice.named
        if not named:
            return BlockStep((), self.model, None, [note])
        return BlockStep(named, *depth.remove(self.model, self.inputs, self.kwargs, named,
                                              removable, in_place), [note])
