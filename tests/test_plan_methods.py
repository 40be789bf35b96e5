"""The estimator plan methods (sparge, anchor_attention, ...): what each rule chooses on inputs
where the answer is known, parameters refused, and the reference agreeing on odd shapes."""

import math

import pytest
import torch

from longattn import attention, from_string, methods
from longattn.call import make_call
from longattn.methods.anchor_attention import anchor_logits
from longattn.methods.dhsa import chunk_ids, chunk_representations
from longattn.methods.sale import quantise_blocks
from longattn.methods.sparge import block_self_similarity
from longattn.prefill import make_view
from longattn.testing import assert_attention_close, make_qkv

BS = 16  # 128 tokens -> 8 blocks in the constructed cases
D = 8
SCALE = 1 / math.sqrt(D)

ESTIMATOR_SPECS = [
    "sparge:block_size=16,budget=0.7,theta=-1",
    "sparge:block_size=16,budget=0.9",
    "anchor_attention:block_size=16,theta=1",
    "anchor_attention:block_size=16,theta=3,budget=0.5,sink_blocks=0",
    "hip:block_size=16,budget=0.25",
    "proxy_attn:block_size=16,budget=0.5,samples=4",
    "proxy_attn:block_size=16,budget=0.8,proxy_heads=2,sink_blocks=0",
    "sale:block_size=16,threshold=0.5",
    "sale:block_size=16,bits=4,threshold=0.2,budget=0.5",
    "dhsa:block_size=16,chunk_size=16,budget=0.3",
    "dhsa:block_size=16,chunk_size=8,budget=0.5,sink_blocks=0",
]


def _plan(method, q, k) -> torch.Tensor:
    """The method's raw plan (before the library adds sinks and local blocks), [nq, nk] of the
    first batch row and head."""
    view = make_view(make_call(q, k, k, method))
    chosen = method.plan(view)
    assert chosen.dtype == torch.bool and chosen.shape[-2:] == view.causal.shape
    return chosen[0, 0]


def _blocks(row: torch.Tensor) -> list[int]:
    return row.nonzero().flatten().tolist()


def _unit(i: int) -> torch.Tensor:
    return torch.eye(D)[i]


def _tokens(vectors: list[torch.Tensor]) -> torch.Tensor:
    """One vector per block of BS tokens -> [1, 1, len * BS, D]."""
    return torch.stack(vectors).repeat_interleave(BS, 0).view(1, 1, -1, D)


def _noise(seed: int) -> torch.Tensor:
    return torch.randn(BS, D, generator=torch.Generator().manual_seed(seed))


def test_self_similarity_is_the_mean_pairwise_cosine():
    x = torch.randn(1, 1, 20, 5, generator=torch.Generator().manual_seed(0))
    sim = block_self_similarity(x, 8)
    for b, lo in enumerate(range(0, 20, 8)):
        unit = torch.nn.functional.normalize(x[0, 0, lo : lo + 8], dim=-1)
        torch.testing.assert_close(sim[0, 0, b], (unit @ unit.T).mean())
    same = torch.ones(1, 1, 8, 5)
    assert torch.allclose(block_self_similarity(same, 8), torch.ones(1))


def test_sparge_keeps_the_predicted_mass():
    q = _tokens([_unit(0)] * 8)
    keys = [_unit(1)] * 8
    keys[5] = _unit(0) * 10  # pooled logit 10 / sqrt(8): 0.8 of row 7's predicted mass
    plan = _plan(methods.Sparge(block_size=BS, budget=0.5, theta=-1), q, _tokens(keys))
    assert _blocks(plan[7]) == [5]
    assert _blocks(plan[3]) == [0, 1]  # a flat row: the first half, ties towards earlier blocks


def test_sparge_visits_all_of_an_unreliable_block():
    q = _tokens([_unit(0)] * 8)
    keys = _tokens([_unit(1)] * 8)
    keys[0, 0, 2 * BS : 3 * BS] = _noise(1)  # key block 2 is not self-similar
    q[0, 0, 6 * BS : 7 * BS] = _noise(2)  # neither is query block 6
    keys[0, 0, 5 * BS : 6 * BS] = _unit(0) * 10
    plan = _plan(methods.Sparge(block_size=BS, budget=0.5, theta=0.5), q, keys)
    assert _blocks(plan[7]) == [2, 5]  # the column of the unreliable key block
    assert _blocks(plan[6]) == list(range(7))  # the whole causal row of the unreliable query block
    assert _blocks(plan[1]) == [0]


def _anchor_case() -> tuple[torch.Tensor, torch.Tensor]:
    """Queries along e0; the sink block scores 4, one key of block 5 scores 4, all else -1."""
    q = _tokens([_unit(0)] * 8)
    keys = _tokens([-_unit(0) / SCALE] * 8)
    keys[0, 0, :BS] = 4 * _unit(0) / SCALE
    keys[0, 0, 5 * BS + 3] = 4 * _unit(0) / SCALE
    return q, keys


def test_anchor_keeps_the_stripes_near_the_anchor():
    q, k = _anchor_case()
    plan = _plan(methods.AnchorAttention(block_size=BS, theta=1.0), q, k)
    assert _blocks(plan[7]) == [0, 5]  # a single strong key (stripe) keeps its block
    assert _blocks(plan[5]) == [0, 5]
    assert _blocks(plan[4]) == [0]
    wide = _plan(methods.AnchorAttention(block_size=BS, theta=6.0), q, k)
    assert _blocks(wide[7]) == list(range(8))


def test_anchor_budget_caps_the_count():
    q, k = _anchor_case()
    plan = _plan(methods.AnchorAttention(block_size=BS, theta=6.0, budget=0.25), q, k)
    assert _blocks(plan[7]) == [0, 5]  # the two best margins of 8 causal blocks


def _hill() -> tuple[torch.Tensor, torch.Tensor]:
    """Queries along e0; key block b scores -|b - 5| (every key of a block alike)."""
    q = _tokens([_unit(0)] * 8)
    keys = _tokens([-abs(b - 5) * _unit(0) / SCALE for b in range(8)])
    return q, keys


def test_hip_descends_to_the_best_blocks():
    q, k = _hill()
    one = _plan(methods.HiP(block_size=BS, budget=0.125), q, k)  # k = 1 of 8 causal blocks
    assert _blocks(one[7]) == [5]
    assert _blocks(one[3]) == [3]  # 4 causal blocks: the best of them
    two = _plan(methods.HiP(block_size=BS, budget=0.25), q, k)
    assert _blocks(two[7]) == [4, 5]  # 4 and 6 tie: the earlier


def test_hip_keeps_exactly_its_budget():
    q, k, _ = make_qkv(2, 4, 2, 200, 200, 16, seed=5)
    method = methods.HiP(block_size=BS, budget=0.3)
    view = make_view(make_call(q, k, k, method))
    chosen = method.plan(view)
    expected = torch.ceil(view.causal.sum(-1).double() * 0.3).long()
    assert torch.equal(chosen.sum(-1), expected.expand(2, 4, -1))
    dense = methods.HiP(block_size=BS, budget=1.0).plan(view)
    assert torch.equal(dense, view.causal.expand_as(dense))


def test_proxy_budgets_follow_each_heads_sparsity():
    """Two heads on one key head: head 0 looks only at block 5, head 1 looks everywhere."""
    keys = _tokens([_unit(1)] * 8)
    keys[0, 0, 5 * BS : 6 * BS] = _unit(0)
    q = torch.zeros(1, 2, 8 * BS, D)
    q[0, 0] = 40 * _unit(0)
    method = methods.ProxyAttn(block_size=BS, budget=0.9)
    view = make_view(make_call(q, keys, keys, method))
    chosen = method.plan(view)[0]  # [H, nq, nk]
    assert _blocks(chosen[0, 7]) == [5]  # one block holds head 0's attention
    assert chosen[1, 7].sum() >= 7  # head 1 needs nearly all of its 8 blocks
    assert chosen[1, 7, 5]  # ranked by the shared proxy: block 5 first


def test_proxy_heads_must_divide_the_heads():
    q, k, v = make_qkv(1, 6, 2, 64, 64, 16, seed=1)
    with pytest.raises(ValueError, match="proxy_heads=4"):
        attention(q, k, v, method="proxy_attn:block_size=16,proxy_heads=4")


@pytest.mark.parametrize("bits", [4, 8])
def test_quantised_blocks_are_within_half_a_step(bits):
    x = torch.randn(2, 3, 37, 8, generator=torch.Generator().manual_seed(4)) * 3
    ints, scale = quantise_blocks(x, 16, bits)
    top = 2 ** (bits - 1) - 1
    assert ints.abs().max() <= top and torch.equal(ints, ints.round())
    back = (ints * scale[..., None, None]).flatten(2, 3)[:, :, :37]
    assert ((back - x).abs() <= scale.repeat_interleave(16, -1)[..., :37, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_sale_margins_are_exact_on_the_integer_grid(bits):
    """Inputs already on the quantisation grid (each block's largest magnitude the top code, so
    the scale is 1): the low-precision scores are exact, and the margins equal brute force."""
    top = 2 ** (bits - 1) - 1
    gen = torch.Generator().manual_seed(6)
    q = torch.randint(-top, top + 1, (1, 2, 72, D), generator=gen).float()
    k = torch.randint(-top, top + 1, (1, 1, 72, D), generator=gen).float()
    q[..., ::BS, 0] = top
    k[..., ::BS, 0] = top
    method = methods.SALE(block_size=BS, bits=bits)
    view = make_view(make_call(q, k, k, method))
    logits = (q @ k.transpose(-1, -2)) * view.scale  # [1, 2, 72, 72]
    anchor = anchor_logits(view)[..., :72]
    rel = (logits - anchor.unsqueeze(-1)).masked_fill(~torch.ones(72, 72).tril().bool(), -math.inf)
    rel = torch.nn.functional.pad(rel, (0, 8, 0, 8), value=-math.inf)  # to 5 x 5 blocks
    expected = rel.view(1, 2, 5, BS, 5, BS).amax(dim=(3, 5))
    torch.testing.assert_close(method.margins(view), expected)


def test_sale_keeps_blocks_whose_relative_score_reaches_the_threshold():
    q, k = _anchor_case()
    plan = _plan(methods.SALE(block_size=BS, threshold=math.exp(-1)), q, k)
    assert _blocks(plan[7]) == [0, 5]
    plan4 = _plan(methods.SALE(block_size=BS, bits=4, threshold=math.exp(-1)), q, k)
    assert _blocks(plan4[7]) == [0, 5]


def test_dhsa_cuts_where_the_keys_change():
    lengths = [5, 20, 11, 28]
    k = torch.cat([_unit(i).expand(n, D) for i, n in enumerate(lengths)]).view(1, 1, -1, D)
    ids = chunk_ids(k, 4)[0, 0]
    expected = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])
    assert torch.equal(ids, expected)


def test_dhsa_chunks_are_length_normalised():
    x = torch.ones(1, 1, 10, 2)
    ids = torch.tensor([0] * 4 + [1] * 6).view(1, 1, -1)
    reps = chunk_representations(x, ids, 3)[0, 0]
    torch.testing.assert_close(reps[:, 0], torch.tensor([2.0, math.sqrt(6), 0.0]))


def test_dhsa_keeps_the_block_of_the_matching_chunk():
    """Keys along e1 except one 10-key run along e0 inside block 5; queries along e0."""
    q = _tokens([_unit(0)] * 8)
    k = _tokens([_unit(1)] * 8)
    k[0, 0, 5 * BS + 3 : 5 * BS + 13] = _unit(0)
    # 3 chunks: before the run, the run, after it
    # the budget counts the diagonal (local) block: ceil(0.25 x causal blocks) per query block
    plan = _plan(methods.DHSA(block_size=BS, chunk_size=43, budget=0.25, sink_blocks=0), q, k)
    assert _blocks(plan[7]) == [5, 7]
    assert _blocks(plan[4]) == [0, 4]  # before the run: ties go to the earliest block


@pytest.mark.parametrize(
    "spec, error",
    [
        ("sparge:theta=1.5", ValueError),
        ("sparge:budget=0", ValueError),
        ("anchor_attention:theta=-1", ValueError),
        ("anchor_attention:theta=inf", ValueError),
        ("hip:budget=1.5", ValueError),
        ("proxy_attn:proxy_heads=0", ValueError),
        ("proxy_attn:samples=0", ValueError),
        ("sale:bits=2", ValueError),
        ("sale:threshold=0", ValueError),
        ("sale:threshold=1.5", ValueError),
        ("dhsa:chunk_size=0", ValueError),
    ],
)
def test_bad_parameters_are_refused(spec, error):
    with pytest.raises(error):
        from_string(spec)


def test_non_numeric_thresholds_are_refused():
    with pytest.raises(TypeError):
        methods.Sparge(theta=True)
    with pytest.raises(TypeError):
        methods.AnchorAttention(theta="5")


@pytest.mark.parametrize("spec", ESTIMATOR_SPECS)
@pytest.mark.parametrize("shape", [(2, 6, 2, 75, 75), (1, 4, 4, 50, 130)])
def test_runs_on_odd_lengths_and_gqa(spec, shape):
    batch, heads, n_kv, t_q, t_k = shape
    q, k, v = make_qkv(batch, heads, n_kv, t_q, t_k, 16, seed=3)
    out = attention(q, k, v, method=spec)
    assert_attention_close(out, q, k, v, from_string(spec))
    again = attention(q, k, v, method=spec, impl="reference")
    assert torch.equal(again.state.layout()[0], out.state.layout()[0])  # deterministic plan
