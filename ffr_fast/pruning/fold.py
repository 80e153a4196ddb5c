"""BatchNorm folding for deployment: conv -> bn becomes one conv with a bias (eval mode).

Which layers are convolutions and which are BatchNorms is read from the rule table.

Only pairs where the BN is the conv's single reader and each module is called once are
folded, so no other reader ever sees the folded values. The arithmetic is torch's own
`torch.nn.utils.fusion.fuse_conv_bn_eval`.
"""
from collections import Counter
from typing import List, Tuple

import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from .rules import rule_for
from .surgery import set_submodule


def foldable_pairs(gm: fx.GraphModule) -> List[Tuple[str, str]]:
    """(conv node name, bn node name) of every conv -> bn pair that can be folded."""
    modules = dict(gm.named_modules())
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not _is_affine(modules[node.target]):
            continue
        conv = node.args[0]
        if (isinstance(conv, fx.Node) and conv.op == "call_module"
                and _is_conv(modules[conv.target]) and len(conv.users) == 1
                and calls[conv.target] == 1 and calls[node.target] == 1):
            pairs.append((conv.name, node.name))
    return pairs


def _is_affine(module: nn.Module) -> bool:
    rule = rule_for(module)
    return rule is not None and rule.affine is not None


def _is_conv(module: nn.Module) -> bool:
    """A producer on the channel dimension whose weight has its outputs first (a conv,
    not a transposed one): what fuse_conv_bn_eval folds."""
    rule = rule_for(module)
    return (rule is not None and rule.kind == "producer" and rule.dim == 1
            and rule.params["weight"][0] == "out")


def fold_batchnorms(gm: fx.GraphModule, pairs=None) -> List[Tuple[str, str]]:
    """Fold the given (or every foldable) pair in place; returns (conv path, bn path) pairs.

    The model must be in eval mode: folding uses the BN running statistics."""
    pairs = foldable_pairs(gm) if pairs is None else pairs
    nodes = {n.name: n for n in gm.graph.nodes}
    folded = []
    for conv_name, bn_name in pairs:
        conv, bn = nodes[conv_name], nodes[bn_name]
        fused = fuse_conv_bn_eval(gm.get_submodule(conv.target), gm.get_submodule(bn.target))
        # torch gives a conv that had no bias a frozen one; the BN's shift lives there now,
        # so it trains like the weight (fine-tuning a folded model must not freeze it).
        fused.bias.requires_grad_(fused.weight.requires_grad)
        set_submodule(gm, conv.target, fused)
        folded.append((conv.target, bn.target))
        bypass_batchnorm(gm, conv, bn)
    gm.recompile()
    return folded


def bypass_batchnorm(gm: fx.GraphModule, conv: fx.Node, bn: fx.Node) -> None:
    """Drop a BN node whose arithmetic now lives in its conv (or in a loaded state dict)."""
    bn.replace_all_uses_with(conv)
    gm.graph.erase_node(bn)
    gm.delete_submodule(bn.target)
