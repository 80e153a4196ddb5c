"""FlowHooks, what FFRLoss stands on: the hooks on a model's feature-flow layers, and what
they keep of each training forward (references to its features, the chains they form) until
the loss takes it. The rules per forward are stated in FFRLoss's docstring.
"""
import functools
import warnings
from typing import Dict, List, NamedTuple, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ffr_fast.capture import flat_leaves
from ffr_fast.flow.chains import (
    CapturePoint,
    Chain,
    ChainInfo,
    LayerSpec,
    resolve_layers,
    split_into_chains,
    version_of,
)
from ffr_fast.flow.stream import RESIDUAL_RULE, auto_layers

# What ffr() finds, as the forwards since the last ffr() left it: none yet; a training forward
# that started and did not finish; training forwards ready to penalise; nothing new since
# the last ffr(); inference forwards only; hooks removed.
_NO_FORWARD, _UNFINISHED, _READY, _CONSUMED, _INFERENCE, _REMOVED = (
    "no forward", "unfinished", "ready", "consumed", "inference", "removed")

# Training forwards held for one ffr() before FFRLoss warns that their features (and through
# them their autograd graphs) pile up: far more than the crops of a multi-crop step.
_MANY_PENDING_FORWARDS = 16

# The hooks and ffr() run outside torch.compile's graphs: traced, they would read the
# tracing tensors' version counters rather than the real ones, and an in-place operation
# after a hooked layer inside a compiled graph would go unnoticed.
outside_compiled_graphs = torch.compiler.disable(
    reason="FFRLoss's hooks read the real tensors of a forward (their in-place version "
           "counters), between compiled graphs")


class TrainingForward(NamedTuple):
    """What one training forward left for ffr(): its chains, and every captured shape."""

    chains: List[Chain]
    shapes: List[Tuple[str, Tuple[int, ...]]]


def _no_hidden_state_error(label: str, what: str, value) -> TypeError:
    if isinstance(value, (tuple, list)):
        found = (f"an empty {type(value).__name__}" if not value else
                 f"a {type(value).__name__} whose first element is a {type(value[0]).__name__}")
    else:
        found = f"a {type(value).__name__}"
    return TypeError(
        f"FFRLoss: the hooked layer {label!r} gave {found} as {what}, so it has no hidden "
        "state to penalise: FFRLoss reads a tensor, or the first element of a tuple or list "
        "output. Hook a layer (or a submodule inside it) whose output is the hidden-state "
        "tensor: FFRLoss(model, layers=[...]).")


def _as_call(example_inputs) -> Tuple[tuple, dict]:
    """FFRLoss's `example_inputs` as (args, kwargs)."""
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError("example_inputs must be a tensor, a tuple of positional arguments or a "
                    f"dict of keyword arguments, got {type(example_inputs).__name__}")


def _leaf(value, index: int):
    """What sits at place `index` of `value` flattened as torch.export flattens a module
    call's arguments and outputs (the places ffr_fast.capture records), or None."""
    leaves = flat_leaves(value)
    return leaves[index] if index < len(leaves) else None


class FlowHooks(nn.Module):
    """The hooks of FFRLoss (its subclass) on `model`'s layers (`layers` and `example_inputs`
    as FFRLoss takes them), and the training forwards they captured since the loss last
    took them."""

    def __init__(self, model: nn.Module, layers: Union[str, Sequence[LayerSpec]] = "auto",
                 example_inputs=None):
        super().__init__()
        if isinstance(model, nn.DataParallel):
            raise TypeError("FFRLoss does not support nn.DataParallel: its replicas run the "
                            "hooks in parallel threads, each with part of the batch. Use "
                            "DistributedDataParallel (one process per device), or pass the "
                            "unwrapped model on a single device.")
        if isinstance(model, DistributedDataParallel):
            model = model.module
        # torch.compile's wrapper keeps the module it compiles as `_orig_mod` (no public
        # accessor exists); the hooks go there, and the compiled forward runs them
        model = getattr(model, "_orig_mod", model)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.__dict__["model"] = model  # a reference, deliberately not a submodule
        self._phase = _NO_FORWARD
        self._capturing = False  # whether the forward in flight is a training forward
        self._captured: List[Tuple[str, Tensor, int, bool]] = []
        self._pending: List[TrainingForward] = []  # finished since the last ffr()
        self._calls: Dict[str, int] = {}  # calls of each hooked layer in this forward
        self._no_grad_layers: List[str] = []  # captured with gradients off (see _keep)
        self._warned_many_pending = False
        # What describe() reports about the last training forward (names and shapes only).
        self._last_shapes: List[Tuple[str, Tuple[int, ...]]] = []
        self._last_chains: List[ChainInfo] = []
        self.capture_points: Tuple[CapturePoint, ...] = ()
        self.layer_names: Tuple[str, ...] = ()
        self._hooked_modules: Tuple[str, ...] = ()
        if not (isinstance(layers, str) and layers == "auto"):
            self._install(resolve_layers(model, layers), "explicit layers")
        elif example_inputs is not None:
            self._install(*auto_layers(model, *_as_call(example_inputs)))
        else:
            self.rule = f"{RESIDUAL_RULE}: found at the first training forward"
            self._handles = [model.register_forward_pre_hook(self._find_layers,
                                                             with_kwargs=True)]

    def _install(self, points: Sequence[CapturePoint], rule: str) -> None:
        """Hook the model where `points` say: one hook per module and direction."""
        model = self.model
        self.rule = rule
        self.capture_points = tuple(points)
        self.layer_names = tuple(p.module if p.call is None else p.label(p.call) for p in points)
        modules = dict(model.named_modules())
        points_of: Dict[str, List[CapturePoint]] = {}
        for point in points:
            points_of.setdefault(point.module, []).append(point)
        self._hooked_modules = tuple(points_of)
        self._handles = [model.register_forward_pre_hook(self._start_forward)]
        for name, module_points in points_of.items():
            # One hook a module counts its calls: the input reader where there is one (it
            # runs first), else the output reader. Hooks cost time in every forward.
            inputs = [p for p in module_points if p.input]
            outputs = [p for p in module_points if not p.input]
            if inputs:
                self._handles.append(modules[name].register_forward_pre_hook(
                    functools.partial(self._read_input, name, inputs), with_kwargs=True))
            if outputs:
                self._handles.append(modules[name].register_forward_hook(
                    functools.partial(self._read_output, name, outputs, not inputs)))
        self._handles.append(model.register_forward_hook(self._end_forward))

    @outside_compiled_graphs
    def _find_layers(self, model: nn.Module, args, kwargs) -> None:
        """layers="auto" without an example: the first training forward's call is the
        example (an eval or no_grad forward before it captures nothing, and waits)."""
        if self.__dict__.get("_finding"):
            return
        if not (model.training and torch.is_grad_enabled()):
            self._start_forward(model, args)  # an inference forward: ffr() gives zero
            return
        self.__dict__["_finding"] = True  # the export below calls the model again
        try:
            points, rule = auto_layers(self.model, args, kwargs)
        finally:
            self.__dict__["_finding"] = False
        for handle in self._handles:
            handle.remove()
        self._install(points, rule)
        self._start_forward(model, args)  # its pre-hook came too late for this call

    # -- hooks --------------------------------------------------------------------------
    # The hooks run in every training forward, so their state is plain attributes: written
    # through nn.Module.__setattr__ (which looks for parameters, buffers and submodules)
    # they would cost a measurable part of a small step.
    _PER_FORWARD_STATE = frozenset({"_phase", "_capturing", "_captured", "_pending", "_calls",
                                    "_no_grad_layers", "_last_shapes", "_last_chains"})

    def __setattr__(self, name: str, value) -> None:
        if name in self._PER_FORWARD_STATE:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    @outside_compiled_graphs
    def _start_forward(self, model: nn.Module, args) -> None:
        if self._phase == _REMOVED:
            return
        self._capturing = model.training and torch.is_grad_enabled()
        if self._capturing:
            self._captured, self._calls, self._no_grad_layers = [], {}, []
            self._phase = _UNFINISHED
        elif self._phase in (_NO_FORWARD, _CONSUMED):
            self._phase = _INFERENCE  # what was captured before stays: inference erases nothing

    @outside_compiled_graphs
    def _read_input(self, name: str, inputs: List[CapturePoint], module: nn.Module,
                    args, kwargs) -> None:
        if not self._capturing:
            return
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        for point in inputs:
            if point.call in (None, call):
                label = point.label(call)
                feature = args[0] if args and point.leaf == 0 else _leaf((args, kwargs),
                                                                          point.leaf)
                if not isinstance(feature, Tensor):
                    self._abandon_forward()
                    raise _no_hidden_state_error(label, "its input", feature)
                self._keep(label, feature, point.starts_chain)

    @outside_compiled_graphs
    def _read_output(self, name: str, outputs: List[CapturePoint], counts_calls: bool,
                     module: nn.Module, args, output) -> None:
        if not self._capturing:
            return
        calls = self._calls
        call = calls.get(name, 0) if counts_calls else calls[name] - 1
        if counts_calls:
            calls[name] = call + 1
        for point in outputs:
            if point.call is None or point.call == call:
                label = name if call == 0 else point.label(call)
                feature = (self._hidden_state(label, output) if point.leaf == 0
                           else _leaf(output, point.leaf))
                if not isinstance(feature, Tensor):
                    self._abandon_forward()
                    raise _no_hidden_state_error(label, f"output {point.leaf}", output)
                self._keep(label, feature, point.starts_chain)

    def _hidden_state(self, label: str, output) -> Tensor:
        """The feature a layer's output stands for: the tensor, or a tuple's first element."""
        if isinstance(output, Tensor):
            return output
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            return output[0]
        self._abandon_forward()
        raise _no_hidden_state_error(label, "its output", output)

    def _keep(self, label: str, feature: Tensor, starts_chain: bool = False) -> None:
        if not torch.is_grad_enabled():
            # Inside a training forward with gradients on, a layer that runs without them
            # sits in a region such as checkpoint(..., use_reentrant=True): its output
            # carries no graph, so the penalty could not train anything before it.
            self._no_grad_layers.append(label)
        self._captured.append((label, feature, version_of(feature), starts_chain))

    @outside_compiled_graphs
    def _end_forward(self, model: nn.Module, args, output) -> None:
        if not self._capturing:
            return
        self._capturing = False
        self._last_shapes = [(name, tuple(x.shape)) for name, x, *_ in self._captured]
        chains = split_into_chains(self._captured)
        self._captured = []  # features outside any chain are released now
        self._last_chains = [ChainInfo(tuple(c.names), tuple(c.shape)) for c in chains]
        self._pending.append(TrainingForward(chains, self._last_shapes))
        self._phase = _READY
        self._check_forward()

    def _abandon_forward(self) -> None:
        """Forget every capture since the last ffr(): a forward that raised leaves nothing."""
        self._capturing, self._captured, self._pending = False, [], []
        self._phase = _NO_FORWARD

    def _check_forward(self) -> None:
        """What only a whole forward shows; raised from the model's call, before any loss."""
        if len(self._calls) < len(self._hooked_modules):
            never_called = [name for name in self._hooked_modules if name not in self._calls]
            self._abandon_forward()
            graph_note = (" The model is a torch.fx.GraphModule (a pruned model, say): its "
                          "forward calls leaf modules only; layers='auto' reads its residual "
                          "adds from the graph." if isinstance(self.model, fx.GraphModule)
                          else "")
            raise RuntimeError(f"FFRLoss: the forward never called the hooked layers "
                               f"{never_called}, so they give no feature.{graph_note}")
        if self._no_grad_layers:
            self._abandon_forward()
            raise RuntimeError(
                f"FFRLoss: {self._no_grad_layers} ran with gradients disabled inside a training "
                "forward (typically torch.utils.checkpoint.checkpoint(..., use_reentrant=True)), "
                "so their outputs carry no graph and FFR could not train the layers before "
                "them. Use checkpoint(..., use_reentrant=False), which FFRLoss supports.")
        self._check_chains(self._pending[-1].chains)
        if len(self._pending) > _MANY_PENDING_FORWARDS and not self._warned_many_pending:
            self._warned_many_pending = True
            warnings.warn(
                f"FFRLoss holds the features of {len(self._pending)} training forwards: ffr() "
                "penalises every training forward since the previous ffr(), and keeps their "
                "features (and autograd graphs) until then. Call ffr() once per optimisation "
                "step, and run forwards that are not to be penalised under torch.no_grad() "
                "or model.eval().", stacklevel=4)

    def _check_chains(self, chains: List[Chain]) -> None:
        """What the loss checks of each training forward's chains (FFRLoss: the curvature
        warning); raised or warned from the model's call."""

    def _take_forwards(self) -> List[TrainingForward]:
        """The training forwards since the loss last took them, released from the hooks
        (none after inference forwards only); RuntimeError where there is nothing to take."""
        if self._phase == _INFERENCE:
            return []
        if self._phase != _READY:
            message = self._not_ready_message()
            self._captured, self._pending = [], []  # an unfinished forward's are of no use
            raise RuntimeError(message)
        forwards, self._pending, self._phase = self._pending, [], _CONSUMED
        return forwards

    def _not_ready_message(self) -> str:
        return {
            _NO_FORWARD: "ffr() was called before any forward pass of the model: run "
                         "`out = model(x)` first, then `loss = task_loss + ffr()`",
            _CONSUMED: "ffr() was already called after the last training forward pass and "
                       "its features were released; run the model again before the next "
                       "ffr() (each training forward is penalised once)",
            _UNFINISHED: "the model's last training forward pass did not finish, so its "
                         "chains are incomplete; the features captured since the previous "
                         "ffr() are released: run a full forward before ffr()",
            _REMOVED: "ffr() was called after remove(): the hooks are gone",
        }[self._phase]

    # -- copies -------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """A copy or a pickle (copy.deepcopy(model), torch.save(model), prune()) carries the
        settings and hooks but never the captured features of a forward in flight: the copy
        starts as if no forward had run."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.update(_capturing=False, _captured=[], _pending=[], _calls={},
                     _no_grad_layers=[])
        if state["_phase"] != _REMOVED:
            state["_phase"] = _NO_FORWARD
        return state

    # -- hooks lifetime -----------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook from the model and release captured features."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._capturing, self._captured, self._pending = [], False, [], []
        self._phase = _REMOVED

    @property
    def removed(self) -> bool:
        """Whether remove() took the hooks off."""
        return self._phase == _REMOVED

    def __enter__(self) -> "FlowHooks":
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    # -- description --------------------------------------------------------------------
    @property
    def chains(self) -> List[ChainInfo]:
        """Layer names and feature shape of each chain of the last training forward."""
        return list(self._last_chains)

    def _describe_chains(self) -> str:
        if not self._last_shapes:
            return ("  chains: not formed yet; shapes are known after the first forward in "
                    "training mode. Hooked layers: "
                    + (", ".join(self.layer_names) or "found at that forward"))
        if not self._last_chains:
            return f"  chains: none formed by the last forward (captured {self._last_shapes})"
        lines = [f"  chains of the last training forward (batch {self._last_chains[0].shape[0]}):"]
        for i, chain in enumerate(self._last_chains):
            lines.append(f"    chain {i}: length {len(chain.names)}, shape "
                         f"{chain.shape[1:]}: " + ", ".join(chain.names))
        return "\n".join(lines)
