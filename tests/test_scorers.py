"""Eviction scorers against independent float64 computations of their papers' formulas, per head,
in every dtype, with empty slots, and their refusals (the library's eviction is tested elsewhere)."""

import math

import pytest
import torch

from longattn import methods
from longattn.calibration import Calibration, calibrate_qfilters
from longattn.method import from_string
from longattn.methods.snapkv import pool_by_position
from longattn.testing import METHOD_EXAMPLES, score_view

BATCH, N_KV, N_HEADS, SLOTS, WINDOW, DIM = 2, 2, 4, 24, 5, 8
GROUP = N_HEADS // N_KV
N_SEEN = 40
SCALE = DIM**-0.5
SCORERS = ["snapkv", "pyramidkv", "adakv", "h2o", "tova", "knorm", "qfilters",
           "expected_attention", "attendre"]  # fmt: skip


def _case(seed=0):
    """Held keys at sorted random positions per (row, KV head), with empty slots at the start, in
    the middle and at the end, and one head whose slots are not in position order."""
    gen = torch.Generator().manual_seed(seed)
    positions = torch.stack(
        [torch.randperm(N_SEEN, generator=gen)[:SLOTS].sort().values for _ in range(BATCH * N_KV)]
    ).view(BATCH, N_KV, SLOTS)
    positions[0, 1, 5] = -1
    positions[1, 0, -3:] = -1
    positions[1, 1, 0] = -1
    positions[1, 1] = positions[1, 1, torch.randperm(SLOTS, generator=gen)]
    filters = torch.nn.functional.normalize(torch.randn(N_KV, DIM, generator=gen), dim=-1)
    return {
        "keys": torch.randn(BATCH, N_KV, SLOTS, DIM, generator=gen, dtype=torch.float64),
        "values": torch.randn(BATCH, N_KV, SLOTS, DIM, generator=gen, dtype=torch.float64),
        "positions": positions,
        "queries": torch.randn(BATCH, N_HEADS, WINDOW, DIM, generator=gen, dtype=torch.float64),
        "q_pos": torch.arange(N_SEEN - WINDOW, N_SEEN).expand(BATCH, WINDOW),
        "accumulated": torch.rand(BATCH, N_KV, SLOTS, generator=gen, dtype=torch.float64) * 3,
        "last_hit": torch.randint(-1, N_SEEN, (BATCH, N_KV, SLOTS), generator=gen),
        "filter": filters.double(),
    }


def _view(case, dtype=torch.float64):
    return score_view(
        case["keys"].to(dtype),
        case["values"].to(dtype),
        case["positions"],
        case["queries"].to(dtype),
        case["q_pos"],
        SCALE,
        accumulated=case["accumulated"].float(),
        last_hit=case["last_hit"],
        calibration={"filter": case["filter"].float()},
    )


def _held(case):
    return case["positions"] >= 0


# ---------------------------------------------------------------- float64 oracles, loop by loop


def _row_weights(case, b, head, i):
    """Softmax of one query over the keys it may see, zeros elsewhere (slot order)."""
    kv = head // GROUP
    q, qp = case["queries"][b, head, i], int(case["q_pos"][b, i])
    seen = [j for j in range(SLOTS) if 0 <= int(case["positions"][b, kv, j]) <= qp]
    out = torch.zeros(SLOTS, dtype=torch.float64)
    logits = [SCALE * float(q @ case["keys"][b, kv, j]) for j in seen]
    top = max(logits)
    total = sum(math.exp(x - top) for x in logits)
    for j, x in zip(seen, logits):
        out[j] = math.exp(x - top) / total
    return out


def _pooled(case, b, kv, votes, kernel, pooling):
    """Pool ``votes`` over the held keys in position order (empty slots after them, zero votes;
    zero padding), back in slot order."""
    pos = case["positions"][b, kv].tolist()
    slots = sorted((j for j in range(SLOTS) if pos[j] >= 0), key=lambda j: pos[j])
    slots += [j for j in range(SLOTS) if pos[j] < 0]
    seq = [float(votes[j]) if pos[j] >= 0 else 0.0 for j in slots]
    out = torch.zeros(SLOTS, dtype=torch.float64)
    for r, j in enumerate(slots):
        near = [
            seq[r + o] if 0 <= r + o < SLOTS else 0.0
            for o in range(-kernel // 2 + 1, kernel // 2 + 1)
        ]
        out[j] = max(near) if pooling == "max" else sum(near) / kernel
    return out


def _snapkv(case, kernel=15, pooling="max"):
    out = torch.zeros(BATCH, N_KV, SLOTS, dtype=torch.float64)
    for b in range(BATCH):
        for kv in range(N_KV):
            heads = range(kv * GROUP, (kv + 1) * GROUP)
            votes = sum(_row_weights(case, b, h, i) for h in heads for i in range(WINDOW))
            out[b, kv] = _pooled(case, b, kv, votes, kernel, pooling)
    return out


def _tova(case):
    out = torch.zeros(BATCH, N_KV, SLOTS, dtype=torch.float64)
    for b in range(BATCH):
        for kv in range(N_KV):
            rows = [
                _row_weights(case, b, h, WINDOW - 1) for h in range(kv * GROUP, (kv + 1) * GROUP)
            ]
            out[b, kv] = sum(rows) / GROUP
    return out


def _expected_attention(case, vnorm=True, covariance=True):
    """E[exp(s q.k)] for q ~ N(mean, cov) of each head's window, normalised over the held keys,
    averaged over the group, times ||v||."""
    out = torch.zeros(BATCH, N_KV, SLOTS, dtype=torch.float64)
    for b in range(BATCH):
        for kv in range(N_KV):
            held = [j for j in range(SLOTS) if int(case["positions"][b, kv, j]) >= 0]
            for h in range(kv * GROUP, (kv + 1) * GROUP):
                qs = case["queries"][b, h]
                mean = qs.mean(0)
                cov = sum(torch.outer(q - mean, q - mean) for q in qs) / WINDOW
                log_z = []
                for j in held:
                    k = case["keys"][b, kv, j]
                    spread = float(k @ cov @ k) if covariance else 0.0
                    log_z.append(SCALE * float(mean @ k) + SCALE**2 / 2 * spread)
                top = max(log_z)
                total = sum(math.exp(x - top) for x in log_z)
                for j, x in zip(held, log_z):
                    out[b, kv, j] += math.exp(x - top) / total / GROUP
            if vnorm:
                out[b, kv] *= case["values"][b, kv].pow(2).sum(-1).sqrt()
    return out


def _attendre_lru(case):
    out = torch.zeros(BATCH, N_KV, SLOTS, dtype=torch.float64)
    for index in range(BATCH * N_KV * SLOTS):
        b, kv, j = index // (N_KV * SLOTS), index // SLOTS % N_KV, index % SLOTS
        hit, pos = int(case["last_hit"][b, kv, j]), int(case["positions"][b, kv, j])
        out[b, kv, j] = hit if hit > pos else pos
    return out


ORACLES = {
    "snapkv": (methods.SnapKV(), _snapkv),
    "snapkv_avg3": (methods.SnapKV(kernel=3, pooling="avg"), lambda c: _snapkv(c, 3, "avg")),
    "snapkv_kernel1": (methods.SnapKV(kernel=1), lambda c: _snapkv(c, 1)),
    "pyramidkv": (methods.PyramidKV(), _snapkv),
    "adakv": (methods.AdaKV(kernel=5), lambda c: _snapkv(c, 5)),
    "h2o": (methods.H2O(), lambda c: c["accumulated"].float().double()),
    "tova": (methods.TOVA(), _tova),
    "knorm": (methods.KNorm(), lambda c: -c["keys"].pow(2).sum(-1).sqrt()),
    "qfilters": (
        methods.QFilters(calibration="unused.safetensors"),
        lambda c: -(c["keys"] * c["filter"].float().double()[None, :, None]).sum(-1),
    ),
    "expected_attention": (methods.ExpectedAttention(), _expected_attention),
    "expected_attention_mean": (
        methods.ExpectedAttention(vnorm=False, covariance=False),
        lambda c: _expected_attention(c, vnorm=False, covariance=False),
    ),
    "attendre_lru": (methods.Attendre(), _attendre_lru),
    "attendre_lfu": (methods.Attendre(policy="lfu"), lambda c: c["accumulated"].float().double()),
}


@pytest.mark.parametrize("name", ORACLES)
def test_scores_equal_the_float64_formula(name):
    method, oracle = ORACLES[name]
    case = _case()
    got = method.score(_view(case))
    assert got.dtype == torch.float64 and got.shape == (BATCH, N_KV, SLOTS)
    held = _held(case)
    torch.testing.assert_close(got[held], oracle(case)[held], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ORACLES)
def test_low_precision_inputs_give_finite_float32_scores(name, dtype):
    method, oracle = ORACLES[name]
    case = _case(seed=1)
    got = method.score(_view(case, dtype))
    held = _held(case)
    assert got.dtype == torch.float32 and got.shape == (BATCH, N_KV, SLOTS)
    assert torch.isfinite(got[held]).all()
    if dtype == torch.float32:  # float32 inputs: the formula up to float32 rounding
        torch.testing.assert_close(got[held].double(), oracle(case)[held], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ORACLES)
def test_a_head_is_scored_from_its_own_keys_only(name):
    """Changing what KV head 1 holds (keys, values, statistics, filter) changes head 1's scores
    and leaves head 0's exactly as they were."""
    method, _ = ORACLES[name]
    case = _case(seed=2)
    before = method.score(_view(case))
    changed = {k: v.clone() for k, v in case.items()}
    gen = torch.Generator().manual_seed(3)
    changed["keys"][:, 1] = torch.randn(BATCH, SLOTS, DIM, generator=gen, dtype=torch.float64)
    changed["values"][:, 1] *= 2
    changed["accumulated"][:, 1] += torch.rand(BATCH, SLOTS, generator=gen, dtype=torch.float64)
    changed["last_hit"][:, 1] = N_SEEN + 5
    changed["filter"][1] = -changed["filter"][1]
    after = method.score(_view(changed))
    assert torch.equal(after[:, 0], before[:, 0])
    held = _held(case)[:, 1]
    assert not torch.allclose(after[:, 1][held], before[:, 1][held])


@pytest.mark.parametrize("name", ORACLES)
def test_scoring_is_pure_and_rows_are_independent(name):
    """Scoring twice gives the same scores and changes nothing in the view; changing batch row 1
    leaves row 0's scores exactly as they were."""
    method, _ = ORACLES[name]
    case = _case(seed=5)
    view = _view(case)
    inputs = [t.clone() for t in (view.keys, view.values, view.queries, view.accumulated)]
    first = method.score(view)
    assert torch.equal(method.score(view), first)
    for before, now in zip(inputs, (view.keys, view.values, view.queries, view.accumulated)):
        assert torch.equal(before, now)
    changed = {k: v.clone() for k, v in case.items()}
    changed["keys"][1] = changed["keys"][1].flip(-1)
    changed["queries"][1] *= -1
    changed["accumulated"][1] += 1
    changed["last_hit"][1] = N_SEEN + 5
    assert torch.equal(method.score(_view(changed))[0], first[0])


@pytest.mark.parametrize("name", ORACLES)
def test_empty_slots_are_ignored(name):
    """Whatever an empty slot holds (NaN here), the held keys' scores are unchanged."""
    method, _ = ORACLES[name]
    case = _case(seed=4)
    before = method.score(_view(case))
    empty = ~_held(case)
    dirty = {k: v.clone() for k, v in case.items()}
    dirty["keys"][empty] = torch.nan
    dirty["values"][empty] = torch.nan
    dirty["last_hit"][empty] = 10**6
    after = method.score(_view(dirty))
    assert torch.equal(after[~empty], before[~empty])


def test_snapkv_pools_by_position_not_by_slot():
    """A single voted key lends its pooled vote to its neighbours by position, wherever they sit."""
    case = _case()
    votes = torch.zeros(BATCH, N_KV, SLOTS, dtype=torch.float64)
    positions = case["positions"]
    votes[1, 1, positions[1, 1].argmax()] = 1.0  # the newest key of the shuffled head
    pooled = pool_by_position(votes, positions, 3, "max")[1, 1]
    newest_two = positions[1, 1].topk(2).indices
    held = positions[1, 1] >= 0
    assert set((pooled * held).nonzero().flatten().tolist()) == set(newest_two.tolist())


def test_expected_attention_of_a_constant_window_is_its_attention():
    """Identical window queries have zero covariance: the expected attention is the attention of
    that query (over every held key), averaged over the group."""
    case = _case()
    case["queries"][:] = case["queries"][:, :, :1]
    case["q_pos"] = torch.full((BATCH, WINDOW), N_SEEN)  # sees every held key
    got = methods.ExpectedAttention(vnorm=False).score(_view(case))
    torch.testing.assert_close(got, _tova(case), rtol=1e-12, atol=1e-14)


def test_attendre_lru_evicts_never_attended_keys_first_in_first_out():
    case = _case()
    case["last_hit"][:] = -1
    got = methods.Attendre().score(_view(case))
    held = _held(case)
    assert torch.equal(got[held], case["positions"][held].double())


def test_pyramidkv_and_adakv_are_snapkv_with_their_allocation():
    assert methods.PyramidKV().allocation == "pyramid"
    assert methods.AdaKV().allocation == "ada"
    assert methods.SnapKV().allocation == "uniform"
    assert isinstance(methods.PyramidKV(), methods.SnapKV)
    assert methods.TOVA().window == 1
    assert methods.H2O.needs == methods.Attendre.needs == frozenset({"accumulated"})
    assert methods.KNorm.needs == methods.QFilters.needs == frozenset()


def test_every_scorer_has_examples_that_parse():
    for name in SCORERS:
        for spec in METHOD_EXAMPLES[name]:
            assert from_string(spec).hook == "score"


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda: methods.SnapKV(kernel=4), ValueError, "kernel must be odd.*4"),
        (lambda: methods.SnapKV(kernel=0), ValueError, "kernel must be > 0, got 0"),
        (lambda: methods.SnapKV(kernel="7"), TypeError, "kernel"),
        (lambda: methods.SnapKV(pooling="mean"), ValueError, "pooling.*'mean'"),
        (lambda: methods.PyramidKV(kernel=2), ValueError, "kernel must be odd.*2"),
        (lambda: methods.AdaKV(budget=1.5), ValueError, "budget.*1.5"),
        (lambda: methods.TOVA(window=0), ValueError, "window must be > 0, got 0"),
        (lambda: methods.Attendre(policy="fifo"), ValueError, "policy.*'fifo'"),
        (lambda: methods.ExpectedAttention(vnorm="yes"), TypeError, "vnorm must be bool"),
        (lambda: methods.ExpectedAttention(covariance=1), TypeError, "covariance must be bool"),
        (lambda: methods.QFilters(calibration=3), TypeError, "calibration must be str, got 3"),
        (lambda: methods.H2O(allocation="greedy"), ValueError, "allocation.*'greedy'"),
    ],
)
def test_bad_fields_are_refused(make, error, words):
    with pytest.raises(error, match=words):
        make()


def test_scoring_without_what_the_scorer_reads_is_refused():
    case = _case()
    view = _view(case)
    bare = score_view(view.keys, view.values, view.positions, view.queries, view.q_pos, SCALE)
    with pytest.raises(ValueError, match="QFilters needs its filter directions"):
        methods.QFilters().score(bare)
    with pytest.raises(ValueError, match=r"filter must be \[n_kv_heads, head_dim\]"):
        methods.QFilters().score(_view_with(case, calibration={"filter": torch.ones(3, DIM)}))
    for method in (methods.H2O(), methods.Attendre(), methods.Attendre(policy="lfu")):
        with pytest.raises(ValueError, match="which is None"):
            method.score(bare)
    no_window = _view_with(case, queries=view.queries[:, :, :0], q_pos=view.q_pos[:, :0])
    for method in (methods.SnapKV(), methods.TOVA(), methods.ExpectedAttention()):
        with pytest.raises(ValueError, match=r"w=0"):
            method.score(no_window)


def _view_with(case, **changes):
    import dataclasses

    return dataclasses.replace(_view(case), **changes)


# ---------------------------------------------------------------- Q-Filters calibration


def _captured(directions, n_layers=2, seed=0):
    """Synthetic ``capture_qkv`` output whose queries in each KV head's group are ``3 * u_h`` plus
    isotropic noise: their principal direction is ``u_h``, their mean projects positively on it."""
    gen = torch.Generator().manual_seed(seed)
    captured = {}
    for layer in range(n_layers):
        noise = torch.randn(2, N_HEADS, 64, DIM, generator=gen)
        planted = directions[layer].repeat_interleave(GROUP, dim=0)[None, :, None]  # [1, H, 1, D]
        q = 3 * planted + noise
        k = torch.randn(2, N_KV, 64, DIM, generator=gen)
        captured[layer] = (q, k, torch.randn_like(k))
    return captured


def test_calibrate_qfilters_recovers_the_planted_direction(tmp_path):
    gen = torch.Generator().manual_seed(5)
    directions = torch.nn.functional.normalize(torch.randn(2, N_KV, DIM, generator=gen), dim=-1)
    cal = calibrate_qfilters(_captured(directions), "toy")
    filters = cal.tensors["filter"]
    assert filters.shape == (2, N_KV, DIM)
    # unit vectors signed against the mean query: -u_h
    cosine = (filters * directions).sum(-1)
    assert (cosine < -0.99).all(), cosine
    back = Calibration.load(cal.save(tmp_path / "qf.safetensors"))
    back.check("qfilters", 2, N_KV, DIM)
    torch.testing.assert_close(back.tensors["filter"], filters)
    with pytest.raises(ValueError, match="filter"):
        Calibration("qfilters", "toy", 2, N_KV, DIM, {"filter": filters[..., :4]}).check(
            "qfilters", 2, N_KV, DIM
        )


def test_qfilters_ranks_keys_by_the_expected_dot_product():
    """Queries ``a_i * u`` (a_i > 0): the calibrated filter is -u and QFilters orders the keys as
    the mean query's dot product does."""
    gen = torch.Generator().manual_seed(6)
    u = torch.nn.functional.normalize(torch.randn(1, N_KV, DIM, generator=gen), dim=-1)
    scale = torch.rand(2, N_HEADS, 64, 1, generator=gen) + 0.5
    q = scale * u[0].repeat_interleave(GROUP, dim=0)[None, :, None]
    k = torch.randn(2, N_KV, 64, DIM, generator=gen)
    cal = calibrate_qfilters({0: (q, k, k)}, "toy")
    case = _case()
    got = methods.QFilters().score(_view_with(case, calibration=cal.layer(0)))
    mean_query = q.mean(dim=(0, 2)).view(N_KV, GROUP, DIM)[:, 0]  # [Hkv, D]
    expected = (case["keys"] * mean_query.double()[None, :, None]).sum(-1)
    assert torch.equal(got.argsort(-1), expected.argsort(-1))


# ---------------------------------------------------------------- the hand-built view


def test_reference_weights_are_causal_softmax_rows():
    case = _case()
    view = _view(case)
    q_pos = torch.tensor([[-1, 20, N_SEEN]]).expand(BATCH, 3)
    weights = view.weights(view.queries[:, :, :3], q_pos)  # [B, H, 3, T]
    assert weights.dtype == torch.float64
    assert torch.equal(weights[:, :, 0], torch.zeros_like(weights[:, :, 0]))  # sees nothing
    torch.testing.assert_close(weights[:, :, 1:].sum(-1), torch.ones(BATCH, N_HEADS, 2).double())
    kv_pos = case["positions"].repeat_interleave(GROUP, dim=1)  # [B, H, T]
    assert not weights[:, :, 1][(kv_pos > 20) | (kv_pos < 0)].any()
    at_20 = dict(case, q_pos=torch.full((BATCH, WINDOW), 20))
    for b, h in [(0, 0), (1, 3)]:
        torch.testing.assert_close(weights[b, h, 1], _row_weights(at_20, b, h, 1))
