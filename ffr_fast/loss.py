"""FFRLoss: Feature Flow Regularization as one line in an existing training loop.

    ffr = FFRLoss(model)                  # hooks the layers of the feature flow
    out = model(x)                        # the hooks keep references to their outputs
    loss = task_loss(out, y) + ffr()      # the penalty of this forward's chains
    loss.backward()
"""
import functools
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ffr_fast.chains import (CapturePoint, Chain, ChainInfo, LayerSpec, auto_layers,
                             resolve_layers, split_into_chains)
from ffr_fast.penalty import check_options, flow_penalty_chains

# The phases of the most recent forward of the model, as ffr() sees them.
_NO_FORWARD, _CAPTURING, _READY, _CONSUMED, _INFERENCE, _REMOVED = (
    "no forward", "capturing", "ready", "consumed", "inference", "removed")


class FFRLoss(nn.Module):
    """The FFR penalty (ffr_fast.reference states the math) of a model's feature flow, one call
    per forward.

    Args:
        model: the network (a DistributedDataParallel or torch.compile wrapper is unwrapped:
            the hooks go on the wrapped module, and run in the compiled forward too). It is
            referenced, not registered as a submodule, so `ffr.parameters()`, `ffr.to()` and
            `ffr.state_dict()` leave it alone.
        grad_weight, curv_weight: weights of the flow's gradient and curvature terms. The
            defaults (1e-3 each) make the penalty of a freshly initialised CIFAR ResNet-20/56
            about 0.01-0.05, a few percent of a 10-class cross-entropy; raise them for more
            structured sparsity.
        layers: "auto" (the rules in ffr_fast.chains: residual blocks, or conv-norm-activation
            units of a plain net), or a list of submodule names and/or modules. The order of
            the list does not matter: features are taken in the order the forward produces
            them, and a module called twice in one forward gives two features.
        norm, curvature, eps, delta: the penalty variant (see ffr_fast.flow_penalty).
        chain_weights: optional per-chain factors, in forward order, one per chain that the
            forward forms (checked at every call).
        penalty_fn: None (the default): every chain of a forward goes to one call of the
            fused op (ffr_fast.penalty.flow_penalty_chains). Or a function applied to each chain
            separately, with flow_penalty's signature: ffr_fast.reference.flow_penalty is the
            plain-PyTorch oracle (benchmarks compare the two).

    Behaviour, per forward of `model`:
      - A forward in training mode with gradients enabled (decided when the model's forward
        starts) captures references to the hooked layers' outputs (never copies) and forms
        chains: runs of consecutive same-shape features, length >= 2 (see describe()).
      - A forward in eval() mode or under torch.no_grad() captures nothing, and ffr() after
        it returns a zero tensor, so one loss function serves training and validation.
      - ffr() returns the penalty of the most recent forward and releases its features; a
        second ffr() for the same forward, or ffr() before any forward, raises RuntimeError.
      - A captured output that a later in-place operation (e.g. ReLU(inplace=True)) changed
        is no longer the layer's output: ffr() raises RuntimeError naming the layer.
    """

    def __init__(self, model: nn.Module, grad_weight: float = 1e-3, curv_weight: float = 1e-3,
                 layers: Union[str, Sequence[LayerSpec]] = "auto", norm: str = "squared",
                 curvature: str = "diff", eps: float = 1e-8, delta: float = 1e-6,
                 chain_weights: Optional[Sequence[float]] = None,
                 penalty_fn: Optional[Callable[..., Tensor]] = None):
        super().__init__()
        check_options(grad_weight, curv_weight, norm, curvature, eps, delta)
        if chain_weights is not None:
            chain_weights = [float(w) for w in chain_weights]
            if any(not w >= 0 for w in chain_weights):
                raise ValueError(f"chain_weights must be >= 0, got {chain_weights}")
        if isinstance(model, nn.DataParallel):
            raise TypeError("FFRLoss does not support nn.DataParallel: its replicas run the "
                            "hooks in parallel threads, each with part of the batch. Use "
                            "DistributedDataParallel (one process per device), or pass the "
                            "unwrapped model on a single device.")
        if isinstance(model, DistributedDataParallel):
            model = model.module
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper runs its hooks
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.__dict__["model"] = model  # a reference, deliberately not a submodule
        self.options = dict(grad_weight=grad_weight, curv_weight=curv_weight, norm=norm,
                            curvature=curvature, eps=eps, delta=delta)
        self.chain_weights = chain_weights
        self.penalty_fn = penalty_fn
        if isinstance(layers, str) and layers == "auto":
            points, self.rule = auto_layers(model)
        else:
            points, self.rule = resolve_layers(model, layers), "explicit layers"
        self.capture_points: Tuple[CapturePoint, ...] = tuple(points)
        self.layer_names: Tuple[str, ...] = tuple(
            p.module if p.call is None else p.label(p.call) for p in points)

        self._phase = _NO_FORWARD
        self._captured: List[Tuple[str, Tensor, Optional[int]]] = []
        self._chains: List[Chain] = []
        self._calls: Dict[str, int] = {}  # calls of each hooked layer in this forward
        self._compiling = False  # whether the forward being captured is being compiled
        self._no_grad_layers: List[str] = []  # captured with gradients off (see _capture)
        self._warned_no_curvature = False
        # What describe() reports about the last training forward (names and shapes only).
        self._last_shapes: List[Tuple[str, Tuple[int, ...]]] = []
        self._last_chains: List[ChainInfo] = []
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
                    functools.partial(self._read_input, name, inputs)))
            if outputs:
                self._handles.append(modules[name].register_forward_hook(
                    functools.partial(self._read_output, name, outputs, not inputs)))
        self._handles.append(model.register_forward_hook(self._end_forward))

    # -- hooks --------------------------------------------------------------------------
    # The hooks run in every training forward, so their state is plain attributes: written
    # through nn.Module.__setattr__ (which looks for parameters, buffers and submodules)
    # they would cost a measurable part of a small step.
    _PER_FORWARD_STATE = frozenset({"_phase", "_captured", "_chains", "_calls",
                                    "_no_grad_layers", "_compiling", "_last_shapes",
                                    "_last_chains"})

    def __setattr__(self, name: str, value) -> None:
        if name in self._PER_FORWARD_STATE:
            self.__dict__[name] = value
        else:
            super().__setattr__(name, value)

    def _start_forward(self, model: nn.Module, args) -> None:
        if self._phase == _REMOVED:
            return
        self._captured, self._chains, self._calls, self._no_grad_layers = [], [], {}, []
        # Under torch.compile the version seen while tracing is not the real tensor's, so
        # a compiled forward cannot be checked for later in-place writes (see _keep).
        self._compiling = torch.compiler.is_compiling()
        self._phase = _CAPTURING if model.training and torch.is_grad_enabled() else _INFERENCE

    def _read_input(self, name: str, inputs: List[CapturePoint], module: nn.Module,
                    args) -> None:
        if self._phase != _CAPTURING:
            return
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        for point in inputs:
            if point.call in (None, call) and args and isinstance(args[0], Tensor):
                self._keep(point.label(call), args[0])

    def _read_output(self, name: str, outputs: List[CapturePoint], counts_calls: bool,
                     module: nn.Module, args, output) -> None:
        if self._phase != _CAPTURING:
            return
        calls = self._calls
        call = calls.get(name, 0) if counts_calls else calls[name] - 1
        if counts_calls:
            calls[name] = call + 1
        if not isinstance(output, Tensor):
            return
        for point in outputs:
            if point.call is None or point.call == call:
                self._keep(name if call == 0 else point.label(call), output)

    def _keep(self, label: str, feature: Tensor) -> None:
        if not torch.is_grad_enabled():
            # Inside a training forward with gradients on, a layer that runs without them
            # sits in a region such as checkpoint(..., use_reentrant=True): its output
            # carries no graph, so the penalty could not train anything before it.
            self._no_grad_layers.append(label)
        self._captured.append((label, feature, None if self._compiling else feature._version))

    def _end_forward(self, model: nn.Module, args, output) -> None:
        if self._phase != _CAPTURING:
            return
        self._last_shapes = [(name, tuple(x.shape)) for name, x, _ in self._captured]
        self._chains = split_into_chains(self._captured)
        self._last_chains = [ChainInfo(tuple(c.names), tuple(c.shape)) for c in self._chains]
        self._captured = []  # features outside any chain are released now
        self._phase = _READY
        self._check_forward()

    def _check_forward(self) -> None:
        """What only a whole forward shows; raised from the model's call, before any loss."""
        if len(self._calls) < len(self._hooked_modules):
            never_called = [name for name in self._hooked_modules if name not in self._calls]
            self._chains, self._phase = [], _NO_FORWARD
            graph_note = (" The model is a torch.fx.GraphModule (a pruned model, say): its "
                          "forward calls leaf modules only; layers='auto' reads its residual "
                          "adds from the graph." if isinstance(self.model, fx.GraphModule)
                          else "")
            raise RuntimeError(f"FFRLoss: the forward never called the hooked layers "
                               f"{never_called}, so they give no feature.{graph_note}")
        if self._no_grad_layers:
            self._chains, self._phase = [], _NO_FORWARD
            raise RuntimeError(
                f"FFRLoss: {self._no_grad_layers} ran with gradients disabled inside a training "
                "forward (typically torch.utils.checkpoint.checkpoint(..., use_reentrant=True)), "
                "so their outputs carry no graph and FFR could not train the layers before "
                "them. Use checkpoint(..., use_reentrant=False), which FFRLoss supports.")
        if (self.options["curv_weight"] > 0 and self._chains and not self._warned_no_curvature
                and all(len(chain.names) < 3 for chain in self._chains)):
            self._warned_no_curvature = True  # a property of the model: say it once
            warnings.warn(
                f"FFRLoss: curv_weight={self.options['curv_weight']} but every chain has only "
                "2 features and curvature needs 3 consecutive ones, so the curvature term is "
                "0 and only the gradient term trains. Set curv_weight=0 to say so, or hook "
                f"more layers (layers=[...]).\n{self._describe_chains()}", stacklevel=3)

    # -- the penalty --------------------------------------------------------------------
    def forward(self) -> Tensor:
        """The penalty of the most recent forward of the model (a 0-dim tensor)."""
        if self._phase == _INFERENCE:
            return torch.zeros(())
        if self._phase != _READY:
            self._captured = []  # an unfinished forward's features are of no use
            raise RuntimeError(self._not_ready_message())
        chains, self._chains, self._phase = self._chains, [], _CONSUMED
        if not chains:
            raise ValueError(
                "the last forward formed no chain: a chain needs >= 2 consecutive captured "
                f"features of one shape, and the hooked layers gave {self._last_shapes}. "
                "Pass layers=[...] naming at least two layers with equal output shapes.")
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
        weighted = [(w, chain.features) for w, chain in zip(weights, chains) if w != 0]
        if not weighted:
            return torch.zeros(())
        if self.penalty_fn is None:
            return flow_penalty_chains([features for _, features in weighted],
                                       chain_weights=[w for w, _ in weighted], **self.options)
        return torch.stack([w * self.penalty_fn(features, **self.options)
                            for w, features in weighted]).sum()

    def _not_ready_message(self) -> str:
        return {
            _NO_FORWARD: "ffr() was called before any forward pass of the model: run "
                         "`out = model(x)` first, then `loss = task_loss + ffr()`",
            _CONSUMED: "ffr() was already called for the last forward pass and its features "
                       "were released; run the model again before the next ffr() (one "
                       "penalty per forward)",
            _CAPTURING: "the model's last forward pass did not finish, so its chains are "
                        "incomplete; run a full forward before ffr()",
            _REMOVED: "ffr() was called after remove(): the hooks are gone",
        }[self._phase]

    # -- copies -------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """A copy or a pickle (copy.deepcopy(model), torch.save(model), prune()) carries the
        settings and hooks but never the captured features of a forward in flight: the copy
        starts as if no forward had run."""
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        state.update(_captured=[], _chains=[], _calls={}, _no_grad_layers=[])
        if state["_phase"] != _REMOVED:
            state["_phase"] = _NO_FORWARD
        return state

    # -- hooks lifetime -----------------------------------------------------------------
    def remove(self) -> None:
        """Remove every hook from the model and release captured features."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._captured, self._chains = [], [], []
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
                    "training mode. Hooked layers: " + ", ".join(self.layer_names))
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
