"""nn.MultiheadAttention loses whole heads on the export path when it is called with masks,
as cross-attention, with need_weights or is_causal (multihead.py): the head-pruned layer's
forward computes torch's on unpruned weights for every call, and a pruned model (torch's
transformer layers, hand-written nets) equals the original with the removed heads zeroed on
new random inputs with new masks, and saves and loads. What still keeps the heads: weights
averaged over them that the model reads, a 3D (per-head) mask from outside the model."""
import itertools

import pytest
import torch
from torch import nn

from ffr_fast.pruning import load_pruned, prune, save_pruned
from ffr_fast.pruning.multihead import HeadPrunedMultiheadAttention, capturing_head_pruned
from ffr_fast.testing import kept_heads, relative_error, zero_heads, zeroed_original

WIDTH, HEADS, HEAD_DIM, TARGET, SOURCE, BATCH = 16, 4, 4, 5, 7, 3


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sequence(length: int, batch_first: bool, g: torch.Generator, batch: int = BATCH):
    shape = (batch, length, WIDTH) if batch_first else (length, batch, WIDTH)
    return torch.randn(shape, generator=g)


def padding(source: int, g: torch.Generator, batch: int = BATCH) -> torch.Tensor:
    """A bool key_padding_mask, True on a random tail of each item's keys (one kept)."""
    lengths = torch.randint(1, source + 1, (batch,), generator=g)
    return torch.arange(source)[None, :] >= lengths[:, None]


def causal(length: int) -> torch.Tensor:
    return nn.Transformer.generate_square_subsequent_mask(length)


# ---- the head-pruned forward computes torch's ----------------------------------------------
MASKS = ("none", "padding", "float padding", "2d", "bool 2d", "3d", "padding and 2d")


def masked(target: int, source: int, g: torch.Generator) -> torch.Tensor:
    """A bool attn_mask, True at random, never on the first key (no row masked whole)."""
    mask = torch.rand(target, source, generator=g) < 0.3
    mask[:, 0] = False
    return mask


def masks(kind: str, target: int, source: int, g: torch.Generator, batch: int = BATCH):
    """(key_padding_mask, attn_mask) of one kind, random."""
    kpm = padding(source, g, batch) if "padding" in kind else None
    if kind == "float padding":
        kpm = kpm.float() * -1e4
    attn = {"2d": lambda: torch.randn(target, source, generator=g),
            "padding and 2d": lambda: masked(target, source, g),
            "bool 2d": lambda: masked(target, source, g),
            "3d": lambda: torch.randn(batch * HEADS, target, source, generator=g)}.get(kind)
    return kpm, attn() if attn else None


def twins(batch_first: bool, dropout: float = 0.0):
    """An nn.MultiheadAttention, and a function calling it with the head-pruned forward."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(WIDTH, HEADS, dropout=dropout, batch_first=batch_first)

    def head_pruned(*args, **kwargs):
        with capturing_head_pruned(mha):
            assert type(mha) is HeadPrunedMultiheadAttention
            return mha(*args, **kwargs)
    return mha, head_pruned


def assert_same_call(mha, head_pruned, args, kwargs, what: str):
    out, weights = mha(*args, **kwargs)
    out_pruned, weights_pruned = head_pruned(*args, **kwargs)
    assert relative_error(out_pruned, out) <= 1e-5, what
    assert (weights is None) == (weights_pruned is None), what
    if weights is not None:
        assert weights_pruned.shape == weights.shape, what
        assert relative_error(weights_pruned, weights) <= 1e-5, what


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("inputs", ["self", "cross", "key and value apart"])
def test_the_head_pruned_forward_computes_torchs_on_every_call(batch_first, inputs):
    mha, head_pruned = twins(batch_first)
    mha.eval()  # and without gradients: torch's fused fast path where it applies
    g = generator(1)
    query = sequence(TARGET, batch_first, g)
    source = TARGET if inputs == "self" else SOURCE
    key = query if inputs == "self" else sequence(SOURCE, batch_first, g)
    value = key if inputs != "key and value apart" else sequence(SOURCE, batch_first, g)
    for kind, (need_weights, average), grad in itertools.product(
            MASKS, [(False, True), (True, True), (True, False)], (False, True)):
        kpm, attn_mask = masks(kind, TARGET, source, g)
        kwargs = dict(key_padding_mask=kpm, attn_mask=attn_mask, need_weights=need_weights,
                      average_attn_weights=average)
        with torch.set_grad_enabled(grad):
            assert_same_call(mha, head_pruned, (query, key, value), kwargs,
                             f"{kind}, need_weights={need_weights}, average={average}")


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("with_padding", [False, True])
def test_is_causal_is_a_hint_for_the_mask_as_in_torch(need_weights, with_padding):
    mha, head_pruned = twins(batch_first=True)
    g = generator(2)
    x = sequence(TARGET, True, g)
    kwargs = dict(attn_mask=causal(TARGET).isinf(), is_causal=True, need_weights=need_weights,
                  key_padding_mask=padding(TARGET, g) if with_padding else None)
    assert_same_call(mha, head_pruned, (x, x, x), kwargs, "causal")
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        head_pruned(x, x, x, is_causal=True)


@pytest.mark.parametrize("kind", ["none", "padding", "2d", "3d"])
def test_an_unbatched_call_computes_torchs(kind):
    mha, head_pruned = twins(batch_first=False)
    g = generator(3)
    query, memory = torch.randn(TARGET, WIDTH, generator=g), torch.randn(SOURCE, WIDTH, generator=g)
    kpm, attn_mask = masks(kind, TARGET, SOURCE, g, batch=1)
    kpm = None if kpm is None else kpm[0]
    for need_weights in (False, True):
        assert_same_call(mha, head_pruned, (query, memory, memory),
                         dict(key_padding_mask=kpm, attn_mask=attn_mask,
                              need_weights=need_weights), kind)


@pytest.mark.parametrize("need_weights", [False, True])
def test_dropout_in_training_draws_as_torch_does(need_weights):
    mha, head_pruned = twins(batch_first=True, dropout=0.3)
    mha.train()
    g = generator(4)
    query, memory = sequence(TARGET, True, g), sequence(SOURCE, True, g)
    kpm = padding(SOURCE, g)
    outputs = []
    for call in (mha, head_pruned):
        torch.manual_seed(5)
        outputs.append(call(query, memory, memory, key_padding_mask=kpm,
                            need_weights=need_weights))
    assert relative_error(outputs[1][0], outputs[0][0]) <= 1e-5
    torch.manual_seed(6)
    assert relative_error(head_pruned(query, memory, memory)[0], outputs[0][0]) > 1e-3


# ---- torch's transformer layers, pruned ----------------------------------------------------
def encoder_layer(batch_first: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 32, dropout=0.1, batch_first=batch_first)
    # two heads left, an even count: batch first, torch's fused kernel would run the layer
    # at inference if the head-pruned attention did not say that it cannot
    zero_heads(layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias, [1, 2], HEADS)
    return layer.eval()


def decoder_layer(batch_first: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerDecoderLayer(WIDTH, HEADS, 32, dropout=0.1, batch_first=batch_first)
    zero_heads(layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias, [2], HEADS)
    cross = layer.multihead_attn
    zero_heads(cross.in_proj_weight, cross.in_proj_bias, [0, 3], HEADS)
    return layer.eval()


def encoder_call(batch_first: bool, seed: int):
    g = generator(seed)
    return (sequence(TARGET, batch_first, g),), dict(
        src_mask=masked(TARGET, TARGET, g),
        src_key_padding_mask=padding(TARGET, g))


def decoder_call(batch_first: bool, seed: int):
    g = generator(seed)
    return (sequence(TARGET, batch_first, g), sequence(SOURCE, batch_first, g)), dict(
        tgt_mask=causal(TARGET), tgt_is_causal=True,
        tgt_key_padding_mask=padding(TARGET, g).float() * -1e4,
        memory_mask=torch.randn(TARGET, SOURCE, generator=g),
        memory_key_padding_mask=padding(SOURCE, g).float() * -1e4)


def assert_pruned_equals_zeroed(model, result, make_call, build, tmp_path):
    """The pruner's check passed; the pruned model equals the zeroed original on new random
    inputs and masks, and a saved and loaded copy equals the pruned model."""
    assert result.report.relative_diff <= 1e-5 and not result.report.approximate
    reference = zeroed_original(model, result)
    save_pruned(result, tmp_path / "pruned.pt")
    loaded = load_pruned(tmp_path / "pruned.pt", build)
    for seed in (11, 12):
        args, kwargs = make_call(seed)
        with torch.no_grad():
            pruned = result.model(*args, **kwargs)
            assert relative_error(pruned, reference(*args, **kwargs)) <= 1e-5
            assert torch.equal(loaded(*args, **kwargs), pruned)


@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_layer_with_masks_loses_its_dead_heads(batch_first, tmp_path):
    model = encoder_layer(batch_first)
    args, kwargs = encoder_call(batch_first, seed=1)
    result = prune(model, args, threshold=0, analysis="export", example_kwargs=kwargs)
    assert type(result.model.self_attn) is HeadPrunedMultiheadAttention
    assert kept_heads(result, "self_attn", HEADS, HEAD_DIM) == [0, 3]
    assert result.model.self_attn.num_heads == 2
    assert_pruned_equals_zeroed(model, result, lambda seed: encoder_call(batch_first, seed),
                                lambda: encoder_layer(batch_first), tmp_path)


@pytest.mark.parametrize("batch_first", [True, False])
def test_decoder_layer_loses_self_and_cross_attention_heads(batch_first, tmp_path):
    model = decoder_layer(batch_first)
    args, kwargs = decoder_call(batch_first, seed=1)
    result = prune(model, args, threshold=0, analysis="export", example_kwargs=kwargs)
    assert kept_heads(result, "self_attn", HEADS, HEAD_DIM) == [0, 1, 3]
    assert kept_heads(result, "multihead_attn", HEADS, HEAD_DIM) == [1, 2]
    assert [result.model.self_attn.num_heads, result.model.multihead_attn.num_heads] == [3, 2]
    assert_pruned_equals_zeroed(model, result, lambda seed: decoder_call(batch_first, seed),
                                lambda: decoder_layer(batch_first), tmp_path)


def encoder_stack() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(WIDTH, HEADS, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor: nested at inference
    for dead, layer in zip(([1], [0, 2]), encoder.layers):
        zero_heads(layer.self_attn.in_proj_weight, layer.self_attn.in_proj_bias, dead, HEADS)
    return encoder.eval()


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
def test_encoder_stack_runs_its_nested_inference_path_with_heads_cut(tmp_path):
    model = encoder_stack()

    def call(seed):
        g = generator(seed)
        return (sequence(TARGET, True, g),), dict(src_key_padding_mask=padding(TARGET, g))
    args, kwargs = call(1)
    result = prune(model, args, threshold=0, analysis="export", example_kwargs=kwargs)
    assert [layer.self_attn.num_heads for layer in result.model.layers] == [3, 2]
    assert_pruned_equals_zeroed(model, result, call, encoder_stack, tmp_path)
    args, kwargs = call(13)
    with torch.no_grad():
        pruned = result.model(*args, **kwargs)
    padded = kwargs["src_key_padding_mask"]
    assert padded.any() and (pruned[padded] == 0).all()  # torch's nested path ran: its zeros


# ---- hand-written nets: cross-attention, weights, 3D masks ---------------------------------
class Attending(nn.Module):
    """A linear layer, an attention of its output to a memory (or to itself), a residual add,
    a linear head; `weights` says what becomes of the attention weights."""

    def __init__(self, weights: str = "dropped", cross: bool = True):
        super().__init__()
        self.weights, self.cross = weights, cross
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
        self.head = nn.Linear(WIDTH, 8)

    def forward(self, x, memory=None, key_padding_mask=None, attn_mask=None):
        y = self.fc(x)
        source = memory if self.cross else y
        out, weights = self.mha(y, source, source, key_padding_mask=key_padding_mask,
                                attn_mask=attn_mask, need_weights=self.weights != "none",
                                average_attn_weights=self.weights != "returned per head")
        out = self.head(out + y)
        if self.weights == "read":
            return out * weights.amax(-1, keepdim=True)
        return (out, weights) if self.weights == "returned per head" else out


def attending(weights: str = "dropped", cross: bool = True) -> nn.Module:
    torch.manual_seed(0)
    model = Attending(weights, cross)
    zero_heads(model.mha.in_proj_weight, model.mha.in_proj_bias, [1], HEADS)
    return model.eval()


def attending_call(seed: int, mask: str = "2d"):
    g = generator(seed)
    memory = torch.randn(BATCH, SOURCE, WIDTH, generator=g)
    kpm, attn_mask = masks(mask, TARGET, SOURCE, g)
    given = {"key_padding_mask": kpm, "attn_mask": attn_mask}
    return (torch.randn(BATCH, TARGET, WIDTH, generator=g), memory), {
        name: mask for name, mask in given.items() if mask is not None}


@pytest.mark.parametrize("weights", ["none", "dropped"])
def test_cross_attention_with_masks_loses_heads_to_a_ratio(weights, tmp_path):
    model = attending(weights)
    args, kwargs = attending_call(1, "padding and 2d")
    result = prune(model, args, ratio=0.5, analysis="export", example_kwargs=kwargs)
    heads = kept_heads(result, "mha", HEADS, HEAD_DIM)
    assert 1 not in heads and 0 < len(heads) < HEADS
    assert result.report.channels["mha.in_proj_weight"][1] == 3 * len(heads) * HEAD_DIM
    assert_pruned_equals_zeroed(model, result, lambda seed: attending_call(seed, "padding and 2d"),
                                lambda: attending(weights), tmp_path)
    args, kwargs = attending_call(2, "padding and 2d")
    with torch.no_grad():  # a live head went too
        assert relative_error(result.model(*args, **kwargs), model(*args, **kwargs)) > 1e-3


@pytest.mark.parametrize("weights, reason", [("read", "reduced over by mean"),
                                             ("returned per head", "feeds the model output (1)")])
def test_attention_weights_the_model_reads_keep_the_heads(weights, reason):
    model = attending(weights)
    args, kwargs = attending_call(1)
    result = prune(model, args, threshold=0, analysis="export", example_kwargs=kwargs)
    assert result.model.mha.num_heads == HEADS
    assert type(result.model.mha) is nn.MultiheadAttention
    reasons = {r for entry in result.report.unpruned if "mha.in_proj_weight" in entry["layers"]
               for r in entry["reasons"]}
    assert reasons == {reason}


def test_a_per_head_mask_from_outside_keeps_the_heads():
    model = attending(cross=False)
    g = generator(1)
    x = torch.randn(BATCH, TARGET, WIDTH, generator=g)
    result = prune(model, x, threshold=0, analysis="export", example_kwargs={
        "attn_mask": torch.randn(BATCH * HEADS, TARGET, TARGET, generator=g)})
    assert result.model.mha.num_heads == HEADS
    reasons = {r for entry in result.report.unpruned if "mha.in_proj_weight" in entry["layers"]
               for r in entry["reasons"]}
    assert reasons == {"split from a kept dimension (model input or constant)"}


class PerHeadBias(nn.Module):
    """Self-attention whose 3D mask is a learnt per-head bias, expanded over the batch."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.mha = nn.MultiheadAttention(WIDTH, HEADS)
        self.bias = nn.Parameter(torch.randn(HEADS, TARGET, TARGET))

    def forward(self, x):  # (L, N, E)
        y = self.fc(x)
        batch = x.shape[1]
        mask = self.bias.expand(batch, -1, -1, -1).reshape(-1, TARGET, TARGET)
        return self.mha(y, y, y, attn_mask=mask, need_weights=False)[0] + y


def per_head_bias() -> nn.Module:
    torch.manual_seed(0)
    model = PerHeadBias()
    zero_heads(model.mha.in_proj_weight, model.mha.in_proj_bias, [0, 2], HEADS)
    return model.eval()


def test_a_per_head_mask_from_a_parameter_loses_its_heads_with_them(tmp_path):
    model = per_head_bias()

    def call(seed):
        return (sequence(TARGET, False, generator(seed)),), {}
    result = prune(model, call(1)[0], threshold=0, analysis="export")
    assert kept_heads(result, "mha", HEADS, HEAD_DIM) == [1, 3]
    assert result.structure["kept"]["bias"] == [[1, 3], None, None]
    assert result.model.bias.shape == (2, TARGET, TARGET)
    assert_pruned_equals_zeroed(model, result, call, per_head_bias, tmp_path)
    x = sequence(TARGET, False, generator(2))
    mask = torch.randn(BATCH * HEADS, TARGET, TARGET)  # one per original head
    with pytest.raises(RuntimeError, match=r"3D mask must be \(N \* num_heads, L, S\)"):
        result.model.mha(x, x, x, attn_mask=mask)
