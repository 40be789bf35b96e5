"""The C++ block-sparse kernel (impl="sparse_cpp") against the float64 oracle.

Skipped only when no C++ compiler exists; with one, a build failure fails these tests. bfloat16
runs on every CPU (``block_sparse.bf16_path()``: oneDNN's bf16 brgemm where it runs, else the
float32 micro-kernel on widened tiles) and is held to the same derived bound as float32.
"""

import shutil

import pytest
import torch

from longattn import attention, methods
from longattn.api import choose_impl, make_call
from longattn.kernels import block_sparse, extension
from longattn.method import from_string
from longattn.testing import assert_attention_close, check_against_reference, make_qkv
from longattn.types import BlockIndex

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler (g++)")

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


def _causal(b, h, qp, kp):
    return kp <= qp


def _runs(dtype, fn):
    """``fn()``: every dtype of DTYPES runs on every CPU the extension builds on."""
    assert dtype != torch.bfloat16 or block_sparse.bf16_supported()
    return fn()


def _check(got, q, k, v, visible, scale):
    """Within the contract's derived bound of the float64 oracle (out and lse), every dtype."""
    check_against_reference(got, q, k, v, visible, scale)


def test_the_kernel_builds():
    assert extension.unavailable(block_sparse.NAME) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (8, 1)], ids=lambda h: f"H{h[0]}kv{h[1]}")
def test_prebuilt_index_gqa_partial_uneven(dtype, per_head, heads):
    """Random layouts (uneven counts per row), causal diagonals as partial blocks, GQA, and a block
    size that does not divide T (ragged last query and key blocks)."""
    n_heads, n_kv = heads
    n, bs, t = 6, 32, 180
    gen = torch.Generator().manual_seed(n_heads + n_kv)
    layout = (torch.rand(1, n_heads if per_head else 1, n, n, generator=gen) < 0.4).tril()
    layout |= torch.eye(n, dtype=torch.bool)
    index = BlockIndex.from_block_mask(
        layout, bs, partial=torch.eye(n, dtype=torch.bool), q_len=t, kv_len=t
    )
    q, k, v = make_qkv(2, n_heads, n_kv, t, t, 32, dtype=dtype, seed=1)
    got = _runs(dtype, lambda: block_sparse_attention_on(q, k, v, index, 0.2, _causal))
    if got is not None:
        _check(got, q, k, v, index.to_dense(_causal), 0.2)


def block_sparse_attention_on(q, k, v, index, scale, mask_fn, **kw):
    return block_sparse.block_sparse_attention(q, k, v, index, scale=scale, mask_fn=mask_fn, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_rows_and_unmasked_partial_blocks(dtype):
    """A query block with no visited key block gets zeros and lse = -inf; without a mask_fn the
    partial blocks are fully visible."""
    layout = torch.tensor(
        [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 1]], dtype=torch.bool
    )
    partial = torch.tensor(
        [[0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.bool
    )
    index = BlockIndex.from_block_mask(layout, 16, partial=partial, q_len=60, kv_len=64)
    q, k, v = make_qkv(1, 2, 2, 60, 64, 16, dtype=dtype, seed=5)
    got = _runs(dtype, lambda: block_sparse_attention_on(q, k, v, index, 0.3, None))
    if got is None:
        return
    assert torch.equal(got.out[:, :, 16:32], torch.zeros_like(got.out[:, :, 16:32]))
    assert torch.isneginf(got.lse[:, :, 16:32]).all()
    _check(got, q, k, v, index.to_dense(), 0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "spec", ["sliding_window:window=100", "streaming_llm:sinks=4,window=64", "dense:causal=false"]
)
def test_methods_through_the_api_with_gqa_and_ragged_blocks(dtype, spec):
    method = from_string(spec)
    q, k, v = make_qkv(1, 8, 2, 300, 300, 64, dtype=dtype, seed=7)
    got = _runs(dtype, lambda: attention(q, k, v, method=method, impl="sparse_cpp"))
    if got is None:
        return
    if dtype == torch.float64:
        visible = make_call(q, k, v, method)
        from longattn.api import visible_mask

        _check(got, q, k, v, visible_mask(visible), q.shape[-1] ** -0.5)
    else:
        assert_attention_close(got, q, k, v, method)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padding_positions(dtype):
    """Left-padded batch rows (position -1): padding keys never attended, padding queries get zeros."""
    layout = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.6
    pos = torch.arange(256).repeat(2, 1)
    pos[0, :50] = -1
    q, k, v = make_qkv(2, 4, 2, 256, 256, 32, dtype=dtype, seed=4)
    for method in (
        methods.StaticBlocks(layout, block_size=64),
        from_string("sliding_window:window=90"),
    ):
        res = _runs(
            dtype,
            lambda m=method: attention(
                q, k, v, method=m, impl="sparse_cpp", q_positions=pos, kv_positions=pos
            ),
        )
        if res is None:
            continue
        assert_attention_close(res, q, k, v, method, q_positions=pos, kv_positions=pos)
        assert torch.equal(res.out[0, :, :50], torch.zeros_like(res.out[0, :, :50]))
        assert torch.isneginf(res.lse[0, :, :50]).all()


def test_causal_diagonals_skip_the_materialised_mask():
    """Sliding-window diagonal blocks are proven causal by the bounds (no bytes); window edges are
    not, so they get a packed byte mask; the result matches the oracle either way."""
    method = from_string("sliding_window:window=300")
    q, k, v = make_qkv(1, 2, 2, 512, 512, 32, seed=9)
    call = make_call(q, k, v, method)
    from longattn.api import block_index

    index = block_index(call)
    pos = torch.arange(512).view(1, -1)
    kinds, masks, _ = block_sparse._slot_kinds(
        index, 2, 1, pos, pos, 512, 512, method.mask, method.block_bounds, True, False
    )
    diag = index.kv_blocks == torch.arange(index.n_q_blocks).view(1, 1, -1, 1)
    assert (kinds[diag] == block_sparse.CAUSAL).all()
    edge = index.partial & ~diag
    assert edge.any() and (kinds[edge] >= 0).all()
    assert masks.shape[2] == int(kinds.max()) + 1
    res = attention(q, k, v, method=method, impl="sparse_cpp")
    assert_attention_close(res, q, k, v, method)


def test_chunked_query_positions():
    """Queries at explicit positions inside a longer key range (chunked prefill)."""
    method = from_string("streaming_llm:sinks=4,window=64")
    q, k, v = make_qkv(1, 4, 2, 70, 400, 64, seed=3)
    q_pos, kv_pos = torch.arange(200, 270), torch.arange(400)
    res = attention(
        q, k, v, method=method, impl="sparse_cpp", q_positions=q_pos, kv_positions=kv_pos
    )
    assert_attention_close(res, q, k, v, method, q_positions=q_pos, kv_positions=kv_pos)


def test_auto_chooses_native_for_block_sparse_masks():
    q, k, v = make_qkv(1, 4, 4, 2048, 2048, 64)
    call = make_call(q, k, v, from_string("sliding_window:window=512"))
    assert choose_impl(call, "auto").name == "sparse_cpp"


def test_bf16_odd_shapes_refused_by_brgemm_run_on_the_float32_path():
    """Odd head dims / block sizes: refused (VNNI pairs) where bf16 runs on brgemm, within the
    oracle's bound where it runs on the float32 micro-kernel."""
    brgemm = block_sparse.bf16_path() == "brgemm"
    for (d, t), method, match in (
        ((63, 64), from_string("sliding_window:window=16"), "even head dim"),
        ((16, 66), methods.StaticBlocks(n_blocks=2, block_size=33), "block size"),
    ):
        q, k, v = make_qkv(1, 2, 2, t, t, d, dtype=torch.bfloat16)
        call = make_call(q, k, v, method)
        if brgemm:
            with pytest.raises(ValueError, match=match):
                choose_impl(call, "sparse_cpp")
        else:
            got = attention(q, k, v, method=method, impl="sparse_cpp")
            assert_attention_close(got, q, k, v, method)


def test_unsupported_calls_say_why():
    assert "float16" in block_sparse.unavailable(torch.float16, torch.device("cpu"), 64)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 16)
    call = make_call(q, k, v, from_string("sliding_window:window=16"), scale=-0.5)
    with pytest.raises(ValueError, match="scale > 0"):
        choose_impl(call, "sparse_cpp")


def test_bad_index_is_a_clear_error_and_validate_false_skips_the_check():
    index = BlockIndex.from_block_mask(torch.ones(4, 4, dtype=torch.bool), 16)
    bad = BlockIndex(index.kv_blocks.flip(-1).contiguous(), index.counts, index.partial, 16, 64, 64)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 8)
    with pytest.raises(ValueError, match="strictly increasing"):
        block_sparse_attention_on(q, k, v, bad, 0.1, None)
    # trusted: the same (reordered, still in-range) index runs unchecked and gives dense attention
    got = block_sparse_attention_on(q, k, v, bad, 0.1, None, validate=False)
    _check(got, q, k, v, None, 0.1)


def test_workspace_release_and_reuse_across_shapes():
    """The packed K/V workspace is reused by a smaller call, regrown by a larger one, and freed."""
    method = from_string("sliding_window:window=64")
    for t, dtype in ((300, torch.float32), (100, torch.bfloat16), (520, torch.bfloat16)):
        q, k, v = make_qkv(1, 2, 2, t, t, 32, dtype=dtype, seed=t)
        res = _runs(
            dtype, lambda q=q, k=k, v=v: attention(q, k, v, method=method, impl="sparse_cpp")
        )
        if res is not None:
            assert_attention_close(res, q, k, v, method)
    block_sparse.release_workspace()
    q, k, v = make_qkv(1, 2, 2, 200, 200, 32, seed=2)
    assert_attention_close(attention(q, k, v, method=method, impl="sparse_cpp"), q, k, v, method)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_batch_and_per_head_index(dtype):
    """An index with its own layout per batch row and per query head (Bi = B, Hi = H), GQA."""
    n, bs, t = 5, 16, 75
    gen = torch.Generator().manual_seed(11)
    layout = (torch.rand(2, 4, n, n, generator=gen) < 0.5).tril() | torch.eye(n, dtype=torch.bool)
    layout[1, 2, 3] = False  # an empty query block in one (batch, head) only
    index = BlockIndex.from_block_mask(
        layout, bs, partial=torch.eye(n, dtype=torch.bool), q_len=t, kv_len=t
    )
    q, k, v = make_qkv(2, 4, 2, t, t, 16, dtype=dtype, seed=12)
    got = _runs(dtype, lambda: block_sparse_attention_on(q, k, v, index, 0.25, _causal))
    if got is None:
        return
    _check(got, q, k, v, index.to_dense(_causal), 0.25)
    assert torch.isneginf(got.lse[1, 2, 3 * bs : 4 * bs]).all()


def test_without_the_extension_auto_takes_sparse_and_native_says_why(monkeypatch):
    """No silent fallback: impl='native' raises with the build reason; auto moves on to 'sparse'."""
    monkeypatch.setattr(extension, "unavailable", lambda name: "no C++ compiler found (test)")
    q, k, v = make_qkv(1, 4, 4, 2048, 2048, 64)
    call = make_call(q, k, v, from_string("sliding_window:window=512"))
    with pytest.raises(ValueError, match="no C\\+\\+ compiler found"):
        choose_impl(call, "sparse_cpp")
    assert choose_impl(call, "auto").name == "sparse"


def test_odd_block_size_float32():
    method = methods.StaticBlocks(n_blocks=4, block_size=33, density=0.6)
    q, k, v = make_qkv(1, 4, 2, 130, 130, 32, seed=13)
    assert_attention_close(attention(q, k, v, method=method, impl="sparse_cpp"), q, k, v, method)


def test_bf16_runs_everywhere_and_its_path_follows_the_cpu():
    """bfloat16 runs on every CPU; on brgemm where oneDNN's bf16 micro-kernel runs (AMX), else on
    the float32 one, and the path agrees with brgemm's own probe."""
    cpu = torch.device("cpu")
    assert block_sparse.unavailable(torch.bfloat16, cpu, 64) is None
    assert block_sparse.bf16_supported()
    refusal = block_sparse._brgemm_refusal("bfloat16")
    assert block_sparse.bf16_path() == ("float32" if refusal else "brgemm")
    if "amx_bf16" in extension.cpu_id().split():
        assert block_sparse.bf16_path() == "brgemm", refusal
    assert block_sparse.unavailable(torch.float32, cpu, 64) is None  # float32 runs on every CPU


def _inputs(**change):
    """A valid call (B=2, H=4, Hkv=2, T=64, D=16, blocks of 16) with some arguments replaced."""
    q, k, v = make_qkv(2, 4, 2, 64, 64, 16, seed=21)
    args = {"q": q, "k": k, "v": v}
    args["index"] = BlockIndex.from_block_mask(torch.ones(4, 4, dtype=torch.bool).tril(), 16)
    args.update(change)
    return args


def _call(args, **kw):
    return block_sparse.block_sparse_attention(
        args["q"], args["k"], args["v"], args["index"], scale=0.25, **kw
    )


_Q, _K, _V = make_qkv(2, 4, 2, 64, 64, 16, seed=21)


@pytest.mark.parametrize(
    "change, kw, error, match",
    [
        ({"q": _Q[0]}, {}, ValueError, r"q must be 4-D.*\(4, 64, 16\)"),
        ({"k": _K.double()}, {}, TypeError, "share a dtype"),
        ({"q": _Q[:, :3]}, {}, ValueError, r"query heads \(3\).*KV heads \(2\)"),
        ({"q": torch.cat([_Q, _Q], -1)}, {}, ValueError, "do not match q"),
        ({"v": _V[:, :, :32]}, {}, ValueError, "k and v shapes differ"),
        ({"index": "dense"}, {}, TypeError, "BlockIndex"),
        ({"q": _Q[:, :, :32]}, {}, ValueError, "index is for q_len=64"),
        ({}, {"q_pos": torch.arange(10)}, ValueError, r"q_pos must have shape \[64\].*\(1, 10\)"),
        ({}, {"kv_pos": torch.arange(63)}, ValueError, "kv_pos must have shape"),
        ({}, {"kv_pos": torch.arange(64).repeat(3, 1)}, ValueError, r"\[1 or 2, 64\]"),
        ({}, {"q_pos": torch.arange(64).view(1, 1, 64)}, ValueError, "q_pos must have shape"),
        ({}, {"q_pos": torch.arange(64.0)}, TypeError, "q_pos must be an integer tensor"),
        ({}, {"kv_pos": list(range(64))}, TypeError, "kv_pos must be a torch.Tensor"),
        ({}, {"skip_below": -1.0}, ValueError, r"skip_below must be >= 0.*-1.0"),
        ({}, {"skip_below": "4"}, TypeError, "skip_below must be a number or None, got str"),
        (
            {"q": _Q.double(), "k": _K.double(), "v": _V.double()},
            {"skip_below": 4.0},
            ValueError,
            "skip_below runs in float32 / bfloat16",
        ),
    ],
)
def test_bad_inputs_are_named_before_the_kernel_reads_them(change, kw, error, match):
    with pytest.raises(error, match=match):
        _call(_inputs(**change), **kw)


def test_index_of_another_shape_is_refused_even_unvalidated():
    """validate=False skips only the contents check; an index for another batch / head count is
    still refused (the kernel would index past it)."""
    layout = torch.ones(3, 4, 4, dtype=torch.bool).tril()  # Bi = 3 for a batch of 2
    args = _inputs(index=BlockIndex.from_block_mask(layout, 16))
    with pytest.raises(ValueError, match="do not fit"):
        _call(args, validate=False)


def test_positions_as_one_row_equal_the_same_row_per_batch():
    args = _inputs()
    pos = torch.arange(64, dtype=torch.int32)
    one = _call(args, q_pos=pos, kv_pos=pos, mask_fn=_causal)
    per_batch = _call(args, q_pos=pos.repeat(2, 1), kv_pos=pos.long().repeat(2, 1), mask_fn=_causal)
    assert torch.equal(one.out, per_batch.out) and torch.equal(one.lse, per_batch.lse)
    _check(one, args["q"], args["k"], args["v"], args["index"].to_dense(_causal), 0.25)


def test_the_compiled_kernel_checks_position_shapes_itself():
    """A direct call with positions shorter than the queries fails in C++ instead of reading past
    them."""
    args = _inputs()
    index = args["index"]
    kinds = torch.full(index.kv_blocks.shape, block_sparse.FULL, dtype=torch.int32)
    masks = torch.zeros(1, 1, 1, 1, 1, dtype=torch.uint8)
    short = torch.arange(10).view(1, -1)
    with pytest.raises(RuntimeError, match="positions"):
        extension.load(block_sparse.NAME).forward(
            args["q"], args["k"], args["v"], index.kv_blocks, index.counts, kinds, masks,
            0, 0, short, torch.arange(64).view(1, -1), 16, 0.25, float("inf"), False,
        )  # fmt: skip


def _skip_case(dtype):
    """Keys whose blocks alternate between aligned with every query (high scores) and opposed
    (scores ~16 below): a causal layout over 8 blocks of 32, partial diagonals, GQA."""
    gen = torch.Generator().manual_seed(31)
    n, bs, t, d = 8, 32, 256, 64
    u = torch.nn.functional.normalize(torch.randn(d, generator=gen), dim=0) * 8
    q = torch.randn(1, 4, t, d, generator=gen) + u
    sign = torch.tensor([1.0 if b % 3 == 0 else -1.0 for b in range(n)]).repeat_interleave(bs)
    k = torch.randn(1, 2, t, d, generator=gen) + sign.view(1, 1, t, 1) * u
    v = torch.randn(1, 2, t, d, generator=gen)
    layout = torch.ones(n, n, dtype=torch.bool).tril()
    index = BlockIndex.from_block_mask(layout, bs, partial=torch.eye(n, dtype=torch.bool))
    return q.to(dtype), k.to(dtype), v.to(dtype), index, d**-0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_skip_below_off_or_large_changes_nothing(dtype):
    q, k, v, index, scale = _skip_case(dtype)
    off = block_sparse_attention_on(q, k, v, index, scale, _causal)
    _check(off, q, k, v, index.to_dense(_causal), scale)
    for lam in (None, 1e4, float("inf")):
        got = block_sparse_attention_on(q, k, v, index, scale, _causal, skip_below=lam)
        assert torch.equal(got.out, off.out) and torch.equal(got.lse, off.lse), lam


def _skip_bound(q, k, v, visible, scale, lam):
    """Per row and coordinate: sum of p_i |v_i| over the visible keys whose scaled score is below
    the row's maximum minus λ (the only keys the rule can drop), in float64."""
    group = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(group, 1)
    v64 = v.double().repeat_interleave(group, 1)
    s = (q.double() @ k64.transpose(-1, -2)) * scale
    s = s.masked_fill(~visible, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.softmax(s, -1)
    small = visible & (s < m - lam)
    return (p * small) @ v64.abs(), int(small.sum())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_skip_below_stays_within_its_bound(dtype):
    """λ = 10: the opposed blocks are dropped (the output changes), lse is unchanged, and the
    change is within the sum of the droppable weights times |v| (<= n exp(-λ) max|v|)."""
    q, k, v, index, scale = _skip_case(dtype)
    lam = 10.0
    off = block_sparse_attention_on(q, k, v, index, scale, _causal)
    got = block_sparse_attention_on(q, k, v, index, scale, _causal, skip_below=lam)
    assert torch.equal(got.lse, off.lse)
    visible = index.to_dense(_causal).view(1, 1, 256, 256)
    bound, n_small = _skip_bound(q, k, v, visible, scale, lam)
    assert n_small > 0
    diff = (got.out.double() - off.out.double()).abs()
    if dtype == torch.float32:
        assert (diff > 0).any()  # something was dropped
        slack = 1e-6 * off.out.double().abs() + 1e-30
    else:  # both outputs are rounded to bfloat16 once: one ulp of either
        slack = 2.0**-7 * off.out.double().abs()
    assert (diff <= bound * (1 + 1e-3) + slack).all(), float((diff - bound - slack).max())
    counts = visible.sum(-1, keepdim=True).double()
    assert (bound <= counts * torch.exp(torch.tensor(-lam)) * v.double().abs().max()).all()
