"""One capture of a model for everything that reads its structure: torch.export's ATen graph.

`capture(model, args, kwargs)` exports the model (non-strict, in eval mode) with the call
signature of every module that holds modules preserved, and the boundary of each leaf module
read off its nodes, so the graph says, for each node, which module calls it ran in and, for
each module call, which values went in and came out. FFRLoss's
chain discovery reads it (ffr_fast.flow.stream); docs/export-design.md says why this is the one
intermediate representation and how the pruner moves onto it.
"""
import inspect
import itertools
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx as fx
from torch import nn

# torch.export flattens a call's arguments and outputs with this module, and no public name
# for it exists (torch.export.pytree is only torch.export's own import of it): the one place
# ffr_fast reads it, so that the places a capture records are read back the same way.
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from .modes import evaluating, restore_training_flags, training_flags


def flat_leaves(value) -> list:
    """`value` (a tensor, a tuple, a dict, a Hugging Face ModelOutput) flattened as
    torch.export flattens a module call's arguments and outputs."""
    return tree_leaves(value)


def flat_tensors(value) -> List[torch.Tensor]:
    """The tensors of `value` (a model's output, a call's arguments), in flattening order."""
    return [leaf for leaf in tree_leaves(value) if isinstance(leaf, torch.Tensor)]


class UncapturableModelError(RuntimeError):
    """torch.export could not capture the model; the message names the failing module, and
    `module` holds its path ("" for the top-level forward)."""

    module = ""


@dataclass(frozen=True)
class ModuleCall:
    """One call of a submodule: `path` (its name in the model), `index` (0 for its first call
    in one forward, 1 for the second, ...) and the graph values it took and handed out, in
    the order torch.export flattens (args, kwargs) and the output ("" for a non-tensor);
    `out_spec`, where export preserved the call's signature, is how the output is built of
    them (a pytree TreeSpec: a tensor, a tuple of a tensor and None, ...), and
    `constant_outputs` the values of its non-tensor outputs (None for a tensor)."""

    path: str
    index: int
    inputs: Tuple[str, ...]
    outputs: Tuple[str, ...]
    out_spec: Any = None
    constant_outputs: Tuple[Any, ...] = ()


def _output_names(program: torch.export.ExportedProgram) -> Dict[str, str]:
    """Output node name -> where the model's output holds it (`encoder_last_hidden_state`
    of T5's Seq2SeqLMOutput, `1` of a tuple), so that a pin says which output keeps it."""
    def leaves(spec) -> List[str]:
        if spec.is_leaf():
            return [""]
        keys = spec.context if isinstance(spec.context, list) and len(
            spec.context) == spec.num_children else range(spec.num_children)
        return [".".join(str(part) for part in (key, inner) if part != "")
                for key, child in zip(keys, spec.children()) for inner in leaves(child)]
    names = leaves(program.call_spec.out_spec)
    users = program.graph_signature.user_outputs
    return dict(zip(users, names)) if len(users) == len(names) else {}


class Capture:
    """A model's ExportedProgram, with the module calls and parameter names looked up once.
    The program itself, with the example call it was captured on, is kept only when asked
    (capture(keep_program=True)): its state_dict holds every parameter of the model, which a
    pruner slicing the model in place must let go of (its graph is all the pruner reads)."""

    def __init__(self, program: torch.export.ExportedProgram, calls_made: Dict[str, int],
                 one_tensor: Set[str] = frozenset()):
        self.program: Optional[torch.export.ExportedProgram] = None
        self.example: Tuple[tuple, dict] = ((), {})
        self.graph: fx.Graph = program.graph
        self.nodes: Dict[str, fx.Node] = {node.name: node for node in self.graph.nodes}
        signature = program.graph_signature
        self.parameters: Dict[str, str] = dict(signature.inputs_to_parameters)
        self.buffers: Dict[str, str] = dict(signature.inputs_to_buffers)
        self.calls: Dict[str, ModuleCall] = {}  # by call id: "layer1.0", "relu@1"
        for entry in program.module_call_graph:
            if entry.fqn and entry.signature is not None:
                path, _, index = entry.fqn.partition("@")
                self.calls[entry.fqn] = ModuleCall(
                    path, int(index or 0),
                    tuple(getattr(a, "name", "") for a in entry.signature.inputs),
                    tuple(getattr(a, "name", "") for a in entry.signature.outputs),
                    entry.signature.out_spec,
                    tuple(getattr(a, "value", None) for a in entry.signature.outputs))
        self.output_names = _output_names(program)
        self._derived_ids: Dict[str, str] = {}  # stack key -> call id, for derived calls
        self._derive_unpreserved_calls(calls_made, one_tensor)
        self.order = {node: i for i, node in enumerate(self.graph.nodes)}

    def _derive_unpreserved_calls(self, calls_made: Dict[str, int], one_tensor: Set[str]
                                  ) -> None:
        """Module calls whose signature export did not keep: the leaf modules (capture()
        preserves only the modules that hold modules, since each preserved signature costs
        export time) and the leaves a GraphModule calls from its own code. Their nodes are
        read off the graph; their boundary is kept only where it is certain: a module in
        `one_tensor` (each call took one tensor and returned one) whose nodes read one value
        and hand out one. Any other boundary is left empty rather than guessed, since the
        order of a call's values is what a hook reads by. A GraphModule's nodes keep the
        module stacks of the model it was traced from, so the calls are counted anew here,
        and the containers it never calls (`calls_made` counts the calls during the export)
        are left out."""
        members: Dict[Tuple[str, str], List[fx.Node]] = {}  # (stack key, path) -> nodes
        for node in self.graph.nodes:
            for key, path in _stack(node):
                if path and _call_id(key, path) not in self.calls and calls_made.get(path):
                    members.setdefault((key, path), []).append(node)
        seen: Dict[str, int] = {}
        for (key, path), nodes in members.items():
            index = seen[path] = seen.get(path, -1) + 1
            if index >= calls_made[path]:
                continue
            inside = set(nodes)
            inputs: List[str] = []
            for node in nodes:
                for arg in node.all_input_nodes:
                    if (arg not in inside and arg.name not in inputs
                            and arg.name not in self.parameters and arg.name not in self.buffers):
                        inputs.append(arg.name)
            outputs = [node.name for node in nodes
                       if any(user not in inside for user in node.users)]
            certain = path in one_tensor and len(inputs) == 1 and len(outputs) == 1
            call_id = f"{path}@{index}" if index else path
            self._derived_ids[key] = call_id
            self.calls[call_id] = ModuleCall(path, index, tuple(inputs) if certain else (),
                                             tuple(outputs) if certain else ())

    def call_stack(self, node: fx.Node) -> List[str]:
        """The ids of the module calls `node` ran in, outermost first (the root excluded)."""
        ids = [self._derived_ids.get(key) or _call_id(key, path) for key, path in _stack(node)]
        return [call for call in ids if call in self.calls]

    def module_path(self, node: fx.Node) -> str:
        """The path of the innermost module `node` ran in ("" for the root)."""
        calls = self.call_stack(node)
        return self.calls[calls[-1]].path if calls else ""

    def reads_parameter(self, node: fx.Node) -> bool:
        """Whether a call node takes a parameter (a weight, a bias, a scale) as an operand."""
        return node.op == "call_function" and any(
            arg.op == "placeholder" and arg.name in self.parameters
            for arg in node.all_input_nodes)

    @staticmethod
    def shape(node) -> Optional[torch.Size]:
        value = node.meta.get("val") if isinstance(node, fx.Node) else None
        return value.shape if isinstance(value, torch.Tensor) else None


def _stack(node: fx.Node) -> List[Tuple[str, str]]:
    """(key, module path) of each module call a node ran in, outermost first."""
    return [(key, path) for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items()]


def _call_id(key: str, path: str) -> str:
    """A module call's id: "path", or "path@index" for the index-th call (0-based) of a
    module called several times in one forward (export's key ends in "@index")."""
    return f"{path}@{key.rpartition('@')[2]}" if "@" in key else path


# The export runs the model's forward; the hooks others keep on it (FFRLoss's own, a
# LayerDrop, a user's logger) must not see that run, and torch has no public way to
# suspend a module's hooks, so their dicts are set aside for the export and put back.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks")


def _suspend_hooks(model: nn.Module) -> List[Tuple[nn.Module, str, dict]]:
    suspended = []
    for module in model.modules():
        for attribute in _HOOK_DICTS:
            hooks = getattr(module, attribute)
            if hooks:
                suspended.append((module, attribute, hooks))
                setattr(module, attribute, type(hooks)())
    return suspended


def _restore_hooks(suspended: List[Tuple[nn.Module, str, dict]]) -> None:
    for module, attribute, hooks in suspended:
        setattr(module, attribute, hooks)


# Modules the capture runs as one op it does not look into (capture's `opaque`): a call's id
# -> (the module's own forward, how its arguments are rebuilt from their tensors, the
# shapes and dtypes of the tensors it returned on the example, how its output is rebuilt).
_OPAQUE: Dict[int, tuple] = {}
_KEYS = itertools.count()  # a key is never used twice, even across captures


@torch.library.custom_op("ffr_fast::opaque_module", mutates_args=())
def opaque_module(inputs: List[torch.Tensor], key: int) -> List[torch.Tensor]:
    """One call of a module the capture does not look into, run as it is."""
    forward, arguments, _, _ = _OPAQUE[key]
    args, kwargs = arguments(inputs)
    return [t.clone() for t in flat_tensors(forward(*args, **kwargs))]


@opaque_module.register_fake
def _(inputs, key):
    _, _, shapes, _ = _OPAQUE[key]
    return [torch.empty(shape, dtype=dtype) for shape, dtype in shapes]


class _Opaque:
    """While it is entered, each of `paths` (modules of `model`) runs as one opaque_module op:
    what torch.export then sees of it is its tensors in and out, with the shapes they had on
    one eager run of the example call (recorded on entering)."""

    def __init__(self, model: nn.Module, paths: Sequence[str], args, kwargs):
        self.model, self.paths, self.example = model, list(paths), (tuple(args), kwargs)
        self.keys: List[int] = []

    def record(self) -> None:
        """One eager run of the example call in eval mode, without gradients: the shapes and
        structure of what each opaque module returns."""
        self.seen: Dict[str, List[tuple]] = {path: [] for path in self.paths}
        if not self.paths:
            return

        def record(path):
            def hook(module, args, kwargs, output):
                leaves, spec = tree_flatten(output)
                if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
                    raise UncapturableModelError(
                        f"the ignored module '{path}' returns other than tensors, which the "
                        "capture cannot run as one op")
                self.seen[path].append(([(leaf.shape, leaf.dtype) for leaf in leaves], spec))
            return hook
        handles = [self.model.get_submodule(path).register_forward_hook(record(path),
                                                                        with_kwargs=True)
                   for path in self.paths]
        try:
            with evaluating(self.model), torch.no_grad():
                self.model(*self.example[0], **self.example[1])
        finally:
            for handle in handles:
                handle.remove()

    def __enter__(self):
        self.own = {}  # a forward set on the instance before, put back on leaving
        for path in self.paths:
            module = self.model.get_submodule(path)
            if "forward" in vars(module):
                self.own[path] = vars(module)["forward"]
            module.forward = self._standing_in(module, self.seen[path])
        return self

    def _standing_in(self, module: nn.Module, calls: List[tuple]):
        forward, made = module.forward, [0]

        def run_opaque(*args, **kwargs):
            leaves, spec = tree_flatten((args, kwargs))
            tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]

            def arguments(inputs):
                rebuilt = list(leaves)
                for i, tensor in zip(tensors, inputs):
                    rebuilt[i] = tensor
                return tree_unflatten(rebuilt, spec)
            shapes, out_spec = calls[min(made[0], len(calls) - 1)]
            made[0] += 1
            key = next(_KEYS)
            _OPAQUE[key] = (forward, arguments, shapes, out_spec)
            self.keys.append(key)
            outputs = opaque_module([leaves[i] for i in tensors], key)
            return tree_unflatten(list(outputs), out_spec)
        return run_opaque

    def __exit__(self, *exc):
        for path in self.paths:
            module = self.model.get_submodule(path)
            del module.forward  # the class's forward again
            if path in self.own:
                module.forward = self.own[path]
        for key in self.keys:
            del _OPAQUE[key]


def capture(model: nn.Module, args: Sequence = (), kwargs: Optional[dict] = None,
            keep_program: bool = False, training: bool = False, opaque: Sequence[str] = ()
            ) -> Capture:
    """`model` exported on the example call `model(*args, **kwargs)`, in eval mode; every
    training flag, parameter and buffer of the model is left as it was. A failure raises
    UncapturableModelError naming the innermost module whose forward was running. With
    `keep_program` the capture holds the ExportedProgram, to run its graph (graph_values).
    With `training` the forward is captured in training mode instead: code that runs only
    in training (an auxiliary head) is in the graph, and the running statistics a batch
    norm would update are not (export runs on fake tensors). The modules `opaque` (paths)
    are captured as one op each, `ffr_fast::opaque_module`, their insides unseen: a module
    export cannot capture (data-dependent control flow) that a pruner keeps whole."""
    if isinstance(model, torch.jit.ScriptModule):
        raise UncapturableModelError(
            f"{type(model).__name__} is a TorchScript module; torch.export captures the eager "
            "nn.Module, so pass the model as it was before torch.jit.script.")
    kwargs = dict(kwargs or {})
    if "use_cache" in inspect.signature(model.forward).parameters:
        # A Hugging Face model would hand its key/value cache object between its layers,
        # which a preserved call signature cannot hold; the cache changes no structure.
        kwargs.setdefault("use_cache", False)
    paths = {module: name for name, module in model.named_modules(remove_duplicate=False)}
    running: List[str] = []
    calls_made: Dict[str, int] = {}
    several: Set[str] = set()  # the modules called with or returning other than one tensor

    def enter(module, args):
        running.append(paths.get(module, type(module).__name__))
        calls_made[running[-1]] = calls_made.get(running[-1], 0) + 1
        if not _one_tensor(args):
            several.add(running[-1])

    def leave(module, _args, output):
        if not _one_tensor(output):
            several.add(running[-1])
        running.pop()

    flags = training_flags(model)
    # a signature is what the boundary of a module holding modules is read by (a block's
    # tuple of outputs); a leaf's boundary is read off its nodes, at half the export's time
    holders = [name for name, module in model.named_modules() if name
               and type(module).forward is not nn.Module.forward
               and next(module.children(), None) is not None]
    suspended = _suspend_hooks(model)
    opaque_calls = _Opaque(model, opaque, args, kwargs)
    try:
        opaque_calls.record()  # before the hooks below count calls
    except Exception:
        _restore_hooks(suspended)
        raise
    hooks = [nn.modules.module.register_module_forward_pre_hook(enter),
             nn.modules.module.register_module_forward_hook(leave)]
    try:
        model.train(training)
        with torch.no_grad(), opaque_calls:
            program = torch.export.export(model, tuple(args), kwargs, strict=False,
                                          preserve_module_call_signature=tuple(holders))
    except Exception as error:
        where = (f"module '{running[-1]}' ({type(model.get_submodule(running[-1])).__name__})"
                 if running and running[-1] else f"the top-level forward of "
                                                 f"{type(model).__name__}")
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        failure = UncapturableModelError(
            f"torch.export cannot capture {type(model).__name__}: it failed in {where}: "
            f"{reason}")
        failure.module = running[-1] if running else ""
        raise failure from error
    finally:
        for hook in hooks:
            hook.remove()
        _restore_hooks(suspended)
        restore_training_flags(model, flags)
    cap = Capture(program, calls_made, {path for path in calls_made if path not in several})
    if keep_program:
        cap.program, cap.example = program, (tuple(args), kwargs)
    return cap


def graph_values(cap: Capture, names: Set[str]) -> Dict[str, torch.Tensor]:
    """The values the nodes `names` of a capture kept with its program take on the example
    call it was captured on, run through its ATen graph (the program's module, whose nodes
    keep the capture's names) in eval mode."""
    values: Dict[str, torch.Tensor] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if node.name in names:
                values[node.name] = value
            return value

    with torch.no_grad():
        Recorder(cap.program.module()).run(*tree_leaves(cap.example))
    return values


def _one_tensor(value) -> bool:
    """Whether a module call's arguments or output are one tensor (alone or in a 1-tuple)."""
    leaves = tree_leaves(value)
    return len(leaves) == 1 and isinstance(leaves[0], torch.Tensor)
