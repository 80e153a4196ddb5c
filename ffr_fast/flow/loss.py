"""FFRLoss: Feature Flow Regularization as one line in an existing training loop.

    ffr = FFRLoss(model)                  # hooks the layers of the feature flow
    out = model(x)                        # the hooks keep references to their outputs
    loss = task_loss(out, y) + ffr()      # the training forwards since the last ffr()
    loss.backward()
"""
import functools
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

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
from ffr_fast.flow.penalty import check_chain_weights, check_options, flow_penalty_chains
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
_outside_compiled_graphs = torch.compiler.disable(
    reason="FFRLoss's hooks read the real tensors of a forward (their in-place version "
           "counters), between compiled graphs")


class _TrainingForward(NamedTuple):
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


class FFRLoss(nn.Module):
    """The FFR penalty (ffr_fast.flow.reference states the math) of a model's feature flow, one call
    per forward.

    Args:
        model: the network (a DistributedDataParallel or torch.compile wrapper is unwrapped:
            the hooks go on the wrapped module; in a compiled forward they run between the
            compiled graphs, one graph break at each hooked layer, so they see the real
            tensors). It is referenced, not registered as a submodule, so `ffr.parameters()`,
            `ffr.to()` and `ffr.state_dict()` leave it alone.
        grad_weight, curv_weight: weights of the flow's gradient and curvature terms. The
            defaults (1e-3 each) make the penalty of a freshly initialised CIFAR ResNet-20/56
            about 0.01-0.05, a few percent of a 10-class cross-entropy; raise them for more
            structured sparsity.
        layers: "auto" (the rules in ffr_fast.flow.stream: the residual stream of the model's
            torch.export graph, or conv-norm-activation units of a plain net), or a list of
            submodule names and/or modules. The order of the list does not matter: features
            are taken in the order the forward produces them, and a module called twice in
            one forward gives two features. A layer's
            feature is its output tensor or, for a layer that returns a tuple or list (a
            hidden state with extras, `(y, aux)`), the first element, which must then be a
            tensor: any other output is refused with an error naming the layer.
        norm, curvature, eps, delta: the penalty variant (see ffr_fast.flow_penalty).
        chain_weights: optional per-chain factors, in forward order, one per chain that
            each forward forms (checked at every call).
        penalty_fn: None (the default): every chain of a forward goes to one call of the
            fused op (ffr_fast.flow.penalty.flow_penalty_chains). Or a function applied to
            each chain separately, with flow_penalty's signature:
            ffr_fast.flow.reference.flow_penalty is the plain-PyTorch oracle (benchmarks
            compare the two).
        example_inputs: for layers="auto", the example call the stream is found on: a
            tensor, a tuple of positional arguments, or a dict of keyword arguments
            (`{"input_ids": ids}`). None (the default): the first training forward's own
            arguments are the example, and the layers are found and hooked then (the
            export costs about a second once; describe() and layer_names are empty until).

    Behaviour, per forward of `model`:
      - A forward in training mode with gradients enabled (decided when the model's forward
        starts) captures references to the hooked layers' features (never copies) and forms
        chains: runs of consecutive same-shape features, length >= 2 (see describe()).
      - A forward in eval() mode or under torch.no_grad() captures nothing and erases
        nothing: a logging or EMA forward between a training forward and ffr() leaves that
        forward's penalty intact. ffr() after inference forwards only returns a zero tensor,
        so one loss function serves training and validation.
      - ffr() returns the penalty of every training forward since the previous ffr() (their
        sum: two crops or a siamese pair are both penalised) and releases their features.
        Call it once per optimisation step, before the backward that frees those forwards'
        graphs. A second ffr() with no training forward in between, or ffr() before any
        forward, raises RuntimeError.
      - A captured feature that a later in-place operation (e.g. ReLU(inplace=True)) changed
        is no longer the layer's output: ffr() raises RuntimeError naming the layer, for a
        compiled forward too.
    """

    def __init__(self, model: nn.Module, grad_weight: float = 1e-3, curv_weight: float = 1e-3,
                 layers: Union[str, Sequence[LayerSpec]] = "auto", norm: str = "squared",
                 curvature: str = "diff", eps: float = 1e-8, delta: float = 1e-6,
                 chain_weights: Optional[Sequence[float]] = None,
                 penalty_fn: Optional[Callable[..., Tensor]] = None,
                 example_inputs=None):
        super().__init__()
        check_options(grad_weight, curv_weight, norm, curvature, eps, delta)
        if chain_weights is not None:
            chain_weights = check_chain_weights(chain_weights)
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
        self.options = dict(grad_weight=grad_weight, curv_weight=curv_weight, norm=norm,
                            curvature=curvature, eps=eps, delta=delta)
        self.chain_weights = chain_weights
        self.penalty_fn = penalty_fn
        self._phase = _NO_FORWARD
        self._capturing = False  # whether the forward in flight is a training forward
        self._captured: List[Tuple[str, Tensor, int, bool]] = []
        self._pending: List[_TrainingForward] = []  # finished since the last ffr()
        self._calls: Dict[str, int] = {}  # calls of each hooked layer in this forward
        self._no_grad_layers: List[str] = []  # captured with gradients off (see _keep)
        self._warned_no_curvature = False
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

    @_outside_compiled_graphs
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

    @_outside_compiled_graphs
    def _start_forward(self, model: nn.Module, args) -> None:
        if self._phase == _REMOVED:
            return
        self._capturing = model.training and torch.is_grad_enabled()
        if self._capturing:
            self._captured, self._calls, self._no_grad_layers = [], {}, []
            self._phase = _UNFINISHED
        elif self._phase in (_NO_FORWARD, _CONSUMED):
            self._phase = _INFERENCE  # what was captured before stays: inference erases nothing

    @_outside_compiled_graphs
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

    @_outside_compiled_graphs
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

    @_outside_compiled_graphs
    def _end_forward(self, model: nn.Module, args, output) -> None:
        if not self._capturing:
            return
        self._capturing = False
        self._last_shapes = [(name, tuple(x.shape)) for name, x, *_ in self._captured]
        chains = split_into_chains(self._captured)
        self._captured = []  # features outside any chain are released now
        self._last_chains = [ChainInfo(tuple(c.names), tuple(c.shape)) for c in chains]
        self._pending.append(_TrainingForward(chains, self._last_shapes))
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
        chains = self._pending[-1].chains
        if (self.options["curv_weight"] > 0 and chains and not self._warned_no_curvature
                and all(len(chain.names) < 3 for chain in chains)):
            self._warned_no_curvature = True  # a property of the model: say it once
            warnings.warn(
                f"FFRLoss: curv_weight={self.options['curv_weight']} but every chain has only "
                "2 features and curvature needs 3 consecutive ones, so the curvature term is "
                "0 and only the gradient term trains. Set curv_weight=0 to say so, or hook "
                f"more layers (layers=[...]).\n{self._describe_chains()}", stacklevel=4)
        if len(self._pending) > _MANY_PENDING_FORWARDS and not self._warned_many_pending:
            self._warned_many_pending = True
            warnings.warn(
                f"FFRLoss holds the features of {len(self._pending)} training forwards: ffr() "
                "penalises every training forward since the previous ffr(), and keeps their "
                "features (and autograd graphs) until then. Call ffr() once per optimisation "
                "step, and run forwards that are not to be penalised under torch.no_grad() "
                "or model.eval().", stacklevel=4)

    # -- the penalty --------------------------------------------------------------------
    @_outside_compiled_graphs
    def forward(self) -> Tensor:
        """The penalty of every training forward of the model since the previous ffr() (the
        sum of each forward's penalty; a 0-dim tensor)."""
        if self._phase == _INFERENCE:
            return torch.zeros(())
        if self._phase != _READY:
            message = self._not_ready_message()
            self._captured, self._pending = [], []  # an unfinished forward's are of no use
            raise RuntimeError(message)
        forwards, self._pending, self._phase = self._pending, [], _CONSUMED
        weighted: List[Tuple[float, List[Tensor]]] = []
        for forward in forwards:
            weighted += self._weighted_chains(forward)
        if not weighted:
            return torch.zeros(())
        if self.penalty_fn is None:
            return flow_penalty_chains([features for _, features in weighted],
                                       chain_weights=[w for w, _ in weighted], **self.options)
        return torch.stack([w * self.penalty_fn(features, **self.options)
                            for w, features in weighted]).sum()

    def _weighted_chains(self, forward: _TrainingForward) -> List[Tuple[float, List[Tensor]]]:
        """The (weight, features) of one forward's chains of nonzero weight, checked."""
        chains = forward.chains
        if not chains:
            raise ValueError(self._no_chain_message(forward.shapes))
        weights = self.chain_weights or [1.0] * len(chains)
        if len(weights) != len(chains):
            raise ValueError(f"chain_weights has {len(weights)} entries but the forward formed "
                             f"{len(chains)} chains:\n{self._describe_chains()}")
        for chain in chains:
            changed = chain.modified_in_place()
            if changed:
                raise RuntimeError(
                    f"the outputs of {changed} were modified in place after FFRLoss captured "
                    "them (e.g. by a following ReLU(inplace=True) or `+=`), so they no longer "
                    "hold those layers' outputs. Hook the module that applies the in-place "
                    "operation instead (layers=[...]) or make that operation out of place.")
        return [(w, chain.features) for w, chain in zip(weights, chains) if w != 0]

    def _no_chain_message(self, shapes: List[Tuple[str, Tuple[int, ...]]]) -> str:
        # Every hooked layer ran (_check_forward) and gave a tensor or was refused, so
        # `shapes` names each of them.
        return (f"a training forward formed no chain: FFRLoss hooked {len(self.layer_names)} "
                f"{self.rule}: {list(self.layer_names)}, which gave features of shapes "
                f"{shapes}: no two consecutive ones have one shape, and a chain needs >= 2 of "
                "them. Pass layers=[...] naming at least two consecutive layers with equal "
                "output shapes.")

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

    def __enter__(self) -> "FFRLoss":
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

    def describe(self) -> str:
        """The settings, the hooked layers and every chain of the last training forward."""
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        if self.chain_weights is not None:
            options += f", chain_weights={self.chain_weights}"
        return (f"FFRLoss({options})\n"
                f"  layers: {len(self.layer_names)} {self.rule}"
                f"{' (removed)' if self._phase == _REMOVED else ''}\n"
                + self._describe_chains())

    def __repr__(self) -> str:
        return self.describe()
