"""FFRLoss: Feature Flow Regularization as one line in an existing training loop.

    ffr = FFRLoss(model)                  # hooks the layers of the feature flow
    out = model(x)                        # the hooks keep references to their outputs
    loss = task_loss(out, y) + ffr()      # the training forwards since the last ffr()
    loss.backward()

The hooks and what they capture per forward are FlowHooks (ffr_fast.flow.hooks); this module
is the penalty of what they captured, and the description of the settings and chains.
"""
import warnings
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ffr_fast.flow.chains import Chain, LayerSpec
from ffr_fast.flow.hooks import FlowHooks, TrainingForward, outside_compiled_graphs
from ffr_fast.flow.penalty import check_chain_weights, check_options, flow_penalty_chains


class FFRLoss(FlowHooks):
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
        check_options(grad_weight, curv_weight, norm, curvature, eps, delta)
        if chain_weights is not None:
            chain_weights = check_chain_weights(chain_weights)
        super().__init__(model, layers, example_inputs)
        self.options = dict(grad_weight=grad_weight, curv_weight=curv_weight, norm=norm,
                            curvature=curvature, eps=eps, delta=delta)
        self.chain_weights = chain_weights
        self.penalty_fn = penalty_fn
        self._warned_no_curvature = False

    def _check_chains(self, chains: List[Chain]) -> None:
        if (self.options["curv_weight"] > 0 and chains and not self._warned_no_curvature
                and all(len(chain.names) < 3 for chain in chains)):
            self._warned_no_curvature = True  # a property of the model: say it once
            warnings.warn(
                f"FFRLoss: curv_weight={self.options['curv_weight']} but every chain has only "
                "2 features and curvature needs 3 consecutive ones, so the curvature term is "
                "0 and only the gradient term trains. Set curv_weight=0 to say so, or hook "
                f"more layers (layers=[...]).\n{self._describe_chains()}", stacklevel=5)

    # -- the penalty --------------------------------------------------------------------
    @outside_compiled_graphs
    def forward(self) -> Tensor:
        """The penalty of every training forward of the model since the previous ffr() (the
        sum of each forward's penalty; a 0-dim tensor)."""
        weighted: List[Tuple[float, List[Tensor]]] = []
        for forward in self._take_forwards():
            weighted += self._weighted_chains(forward)
        if not weighted:
            return torch.zeros(())
        if self.penalty_fn is None:
            return flow_penalty_chains([features for _, features in weighted],
                                       chain_weights=[w for w, _ in weighted], **self.options)
        return torch.stack([w * self.penalty_fn(features, **self.options)
                            for w, features in weighted]).sum()

    def _weighted_chains(self, forward: TrainingForward) -> List[Tuple[float, List[Tensor]]]:
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

    # -- description --------------------------------------------------------------------
    def describe(self) -> str:
        """The settings, the hooked layers and every chain of the last training forward."""
        options = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        if self.chain_weights is not None:
            options += f", chain_weights={self.chain_weights}"
        return (f"FFRLoss({options})\n"
                f"  layers: {len(self.layer_names)} {self.rule}"
                f"{' (removed)' if self.removed else ''}\n"
                + self._describe_chains())

    def __repr__(self) -> str:
        return self.describe()
