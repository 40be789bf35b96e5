"""Shared test and benchmark factories: inputs, the float64 oracle and its derived error bound
(``reference_bound``: a rounding-error model in the reduction lengths, no fitted constant)."""

from __future__ import annotations

import dataclasses
import typing

import torch

from longattn.api import make_call, visible_mask
from longattn.kernels.reference import reference_attention
from longattn.method import Method
from longattn.testing_linear import within as _within
from longattn.types import (
    EXP_ULPS,
    AttnOutput,
    BlockIndex,
    DecodeSelection,
    PrefillPlan,
    ScoreView,
    accumulation_dtype,
)


def make_qkv(
    batch: int = 1,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    q_len: int = 128,
    kv_len: int | None = None,
    head_dim: int = 64,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random q [B, H, Tq, D] and k, v [B, Hkv, Tk, D] (Tk defaults to Tq, Hkv to H)."""
    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    kv_len = q_len if kv_len is None else kv_len
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shapes = [(batch, n_heads, q_len, head_dim)] + [(batch, n_kv_heads, kv_len, head_dim)] * 2
    return tuple(  # type: ignore[return-value]
        torch.randn(s, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
        for s in shapes
    )


def oracle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: Method | None = None,
    *,
    dtype: torch.dtype = torch.float64,
    scale: float | None = None,
    q_positions: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
    selection: DecodeSelection | None = None,
) -> AttnOutput:
    """The dense reference of ``method`` with inputs cast to ``dtype`` (float64: the ground truth).

    ``selection``: for a select method, the selection to materialise (default: computed here)."""
    q, k, v = (t.to(dtype) for t in (q, k, v))
    call = make_call(q, k, v, method, scale, q_positions, kv_positions)
    if selection is not None:
        call = dataclasses.replace(call, selection=selection)
    return reference_attention(call.q, call.k, call.v, visible_mask(call), call.scale)


class Bound(typing.NamedTuple):
    """The float64 reference of a call and what a correct implementation may deviate from it by,
    element by element: ``out`` [B, H, Tq, D], ``lse`` [B, H, Tq] (see ``reference_bound``)."""

    ref: AttnOutput
    out: torch.Tensor
    lse: torch.Tensor


def reference_bound(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None, scale: float
) -> Bound:
    """The float64 reference of attention over ``visible`` and a rounding-error bound for any
    implementation that computes it from ``q, k, v`` in their dtype.

    Model (standard floating-point error analysis, Higham, *Accuracy and Stability of Numerical
    Algorithms*, ch. 3). Let ``u_in`` be the unit roundoff of the inputs' dtype, ``u`` that of the
    accumulation (float32 for float32 and bfloat16 inputs, float64 for float64),
    ``gamma(n) = n u / (1 - n u)``, and ``eta = EXP_ULPS * eps`` the relative error of ``exp``. An
    implementation may sum the D products of a score, the n visible terms of the softmax normaliser
    and of ``P V`` in any order and any split (tiles, threads, merged by log-sum-exp), and may round
    scores, probabilities and the output to the input dtype. For query i with n_i visible keys:

    * a score ``s_ij = scale * q_i . k_j`` is off by at most ``e_ij = (gamma(D) + u_in) a_ij`` with
      ``a_ij = |scale| sum_d |q_id k_jd|`` (the dot product's bound, then a rounding to the dtype);
      let ``E_i = max_j e_ij`` over the visible keys;
    * a softmax weight is a ratio of exponentials, so shifting every score by at most ``E_i`` moves
      it by a factor within ``exp(+-2 E_i)``; each exponential carries ``eta`` and the merge of
      partial results (tiles, threads) another ``eta`` per side; the normaliser's n-term sum adds
      ``gamma(n_i)``; rounding the weight to the dtype adds ``u_in``. Rescaling by the running
      maximum multiplies numerator and denominator by the same rounded factor and cancels, up to
      the products' roundings, which the sums' ``gamma(n_i)`` already count;
    * the n-term sum ``sum_j p_ij v_jd`` adds ``gamma(n_i)`` relative to ``W_id = sum_j p_ij |v_jd|``,
      and rounding the output to the dtype adds ``u_in |out_id|``.

    So ``|out_id - ref_id| <= expm1(2 E_i + 4 eta + 3 gamma(n_i) + 2 u_in) W_id (1 + u_in)
    + u_in |ref_id|``, and for the log-sum-exp (float32, or float64 for float64 inputs, unit
    roundoff ``u_lse``) ``|lse_i - ref_i| <= E_i + 2 eta + 2 gamma(n_i) + (u_lse + eta) |ref_i|``.
    Every term is a property of the dtype, the data and the reduction length; nothing is fitted to
    a kernel. A dropped key moves an output by ``p_ij |v_jd - out_id|``, a wrong scale moves every
    score: both exceed the bound by orders of magnitude in float32 (``tests/test_testing.py``).
    Rows that see no key must be exactly zero with ``lse = -inf``: their bound is 0.
    """
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    ref = reference_attention(q64, k64, v64, visible, scale)
    u_in = torch.finfo(q.dtype).eps / 2
    acc = accumulation_dtype(q.dtype)
    u, eta = torch.finfo(acc).eps / 2, EXP_ULPS * torch.finfo(acc).eps
    batch, n_heads, q_len, dim = q.shape
    group = n_heads // k.shape[1]
    k_abs = k64.abs().repeat_interleave(group, dim=1)  # [B, H, Tk, D]
    v_abs = v64.abs().repeat_interleave(group, dim=1)
    mags = abs(scale) * (q64.abs() @ k_abs.transpose(-1, -2))  # [B, H, Tq, Tk]: a_ij
    shape = (batch, n_heads, q_len, k.shape[2])
    seen = torch.ones(shape, dtype=torch.bool) if visible is None else visible.expand(shape)
    scores = (q64 @ k64.repeat_interleave(group, dim=1).transpose(-1, -2)) * scale
    probs = torch.softmax(scores.masked_fill(~seen, -torch.inf), dim=-1).nan_to_num(0.0)
    weight = probs @ v_abs  # [B, H, Tq, D]: W_id
    n = seen.sum(dim=-1).to(torch.float64)  # [B, H, Tq]
    gamma = lambda m: m * u / (1 - m * u)  # noqa: E731
    largest = mags.masked_fill(~seen, 0.0).amax(dim=-1) if k.shape[2] else n  # [B, H, Tq]
    e_max = (gamma(dim) + u_in) * largest
    rel = torch.expm1(2 * e_max + 4 * eta + 3 * gamma(n) + 2 * u_in)
    out_bound = rel.unsqueeze(-1) * weight * (1 + u_in) + u_in * ref.out.abs()
    u_lse = torch.finfo(ref.lse.dtype if q.dtype == torch.float64 else torch.float32).eps / 2
    lse_abs = ref.lse.abs().nan_to_num(0.0, posinf=0.0)
    lse_bound = e_max + 2 * eta + 2 * gamma(n) + (u_lse + eta) * lse_abs
    return Bound(ref, out_bound.masked_fill(n.unsqueeze(-1) == 0, 0.0), lse_bound)


def check_against_reference(
    result: AttnOutput | torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    visible: torch.Tensor | None,
    scale: float,
) -> float:
    """Assert that ``result`` is within ``reference_bound`` of attention over ``visible``, element by
    element (out, and lse when given); returns max|out - ref64|."""
    bound = reference_bound(q, k, v, visible, scale)
    out = result.out if isinstance(result, AttnOutput) else result
    if out.shape != bound.ref.out.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(bound.ref.out.shape)}")
    if out.dtype != q.dtype:
        raise AssertionError(f"output dtype {out.dtype} != input dtype {q.dtype}")
    _within("out", out.double() - bound.ref.out, bound.out)
    lse = result.lse if isinstance(result, AttnOutput) else None
    if lse is not None and lse.numel():
        ref_lse = bound.ref.lse
        if not torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)):
            raise AssertionError("lse is -inf on different rows than the reference")
        finite = ~torch.isneginf(ref_lse)
        _within("lse", (lse.double() - ref_lse).masked_fill(~finite, 0.0), bound.lse)
    return (out.double() - bound.ref.out).abs().max().item() if out.numel() else 0.0


def with_compensation(
    k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, summary
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float64 oracle's inputs for a layer with compensation tokens (``KVCache.summary``): keys
    k [B, Hkv, Tk, D], values v and ``visible`` [B, H, Tq, Tk] extended by ``n`` copies of each
    (row, KV head)'s mean key and value, visible to every query of that head: the definition of
    attention with a compensation token that stands for ``n`` tokens. None: unchanged."""
    if summary is None:
        return k, v, visible
    batch, n_kv = summary.count.shape
    n = int(summary.count.max())
    extra_k = summary.keys.to(k.dtype)[:, :, None, :].expand(batch, n_kv, n, k.shape[-1])
    extra_v = summary.values.to(v.dtype)[:, :, None, :].expand(batch, n_kv, n, v.shape[-1])
    used = torch.arange(n) < summary.count.unsqueeze(-1)  # [B, Hkv, n]
    group = visible.shape[1] // n_kv
    seen = used.repeat_interleave(group, dim=1)[:, :, None, :]  # [B, H, 1, n]
    seen = seen.expand(*visible.shape[:3], n)
    extended = torch.cat([visible.expand(batch, -1, -1, -1), seen], dim=-1)
    return torch.cat([k, extra_k], dim=2), torch.cat([v, extra_v], dim=2), extended


def kept_channel_queries(q: torch.Tensor, channels: torch.Tensor | None) -> torch.Tensor:
    """q [B, H, Tq, D] with the key channels its KV head does not keep set to zero (``channels``
    [B, Hkv, Dk'] of a channel-pruned cache layer; None: q itself). Its float64 oracle over the
    full keys is the dot product over the kept channels only, ``q[..., kept] . k[..., kept]``,
    at the unchanged scale ``1/sqrt(D)``: the definition of attention over a ThinK layer."""
    if channels is None:
        return q
    kept = torch.zeros(*channels.shape[:2], q.shape[-1], dtype=torch.bool, device=q.device)
    kept.scatter_(-1, channels.to(q.device), True)  # [B, Hkv, D]
    group = q.shape[1] // channels.shape[1]
    return q * kept.repeat_interleave(group, dim=1)[:, :, None, :]


def assert_attention_close(
    result: AttnOutput | torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: Method | None = None,
    **call_kwargs,
) -> float:
    """Assert that ``result`` is within the derived bound (``reference_bound``) of ``method``'s
    float64 oracle on this call, element by element; ``lse`` too when present. Returns the output
    error. A select method's reference uses the selection the result carries."""
    if isinstance(result, AttnOutput) and isinstance(result.state, DecodeSelection):
        call_kwargs.setdefault("selection", result.state)  # the reference uses the same selection
    selection = call_kwargs.pop("selection", None)
    call = make_call(*(t.to(torch.float64) for t in (q, k, v)), method, **call_kwargs)
    if selection is not None:
        call = dataclasses.replace(call, selection=selection)
    if isinstance(result, AttnOutput) and isinstance(result.state, BlockIndex):
        call.derived["block_index"] = result.state  # a plan's blocks, as the result ran them
    if isinstance(result, AttnOutput) and isinstance(result.state, PrefillPlan):
        call.derived["block_index"] = result.state.blocks  # and its columns, as they ran
        call.derived["plan_columns"] = result.state.columns
    return check_against_reference(result, q, k, v, visible_mask(call), call.scale)


def sparse_cpp_runs_bf16() -> bool:
    """Whether the C++ block-sparse kernel runs bfloat16 here: on every CPU it builds on (oneDNN's
    bf16 brgemm where it runs, else its float32 micro-kernel on widened tiles:
    ``longattn.kernels.block_sparse.bf16_path``); the tests require it exactly where this holds."""
    from longattn.kernels import block_sparse

    return block_sparse.bf16_supported()


def reference_weights(
    keys: torch.Tensor, positions: torch.Tensor, scale: float
) -> typing.Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``ScoreView.weights`` by definition: ``(q [B, H, n, D], q_pos [B, n]) -> [B, H, n, T]``
    softmax of ``scale * q . k`` over the held keys a query may see (position <= its own, slot not
    empty), zeros for a query that sees nothing. Materialises ``n x T``; float64 for float64
    inputs, else float32. ``positions`` [B, Hkv, T] (-1 empty)."""

    def weights(q: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
        dtype = torch.float64 if torch.float64 in (q.dtype, keys.dtype) else torch.float32
        batch, n_heads, n, dim = q.shape
        n_kv = keys.shape[1]
        rows = q.to(dtype).reshape(batch, n_kv, -1, dim)  # [B, Hkv, G*n, D]
        logits = (rows @ keys.to(dtype).transpose(-1, -2)) * scale  # [B, Hkv, G*n, T]
        logits = logits.view(batch, n_kv, -1, n, keys.shape[2])  # [B, Hkv, G, n, T]
        kp = positions[:, :, None, None, :]
        visible = (kp >= 0) & (kp <= q_pos[:, None, None, :, None])
        probs = torch.softmax(logits.masked_fill(~visible, -torch.inf), dim=-1).nan_to_num(0.0)
        return probs.view(batch, n_heads, n, -1)

    return weights


def score_view(
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    queries: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    *,
    layer: int = 0,
    n_layers: int = 1,
    accumulated: torch.Tensor | None = None,
    last_hit: torch.Tensor | None = None,
    calibration: dict[str, torch.Tensor] | None = None,
) -> ScoreView:
    """A ``ScoreView`` built by hand for scorer tests, with ``reference_weights``.

    keys, values [B, Hkv, T, D]; positions [B, T] (shared by the heads) or [B, Hkv, T], -1 empty;
    queries [B, H, w, D] at q_pos [B, w] (or [w]); ``n_seen`` is the largest position + 1."""
    batch, n_kv, t, _ = keys.shape
    if positions.dim() == 2:
        positions = positions[:, None].expand(batch, n_kv, t)
    if q_pos.dim() == 1:
        q_pos = q_pos.expand(batch, -1)
    n_seen = max(int(positions.max()), int(q_pos.max()) if q_pos.numel() else -1) + 1
    return ScoreView(
        keys=keys,
        values=values,
        positions=positions,
        queries=queries,
        q_pos=q_pos,
        scale=scale,
        layer=layer,
        n_layers=n_layers,
        n_seen=n_seen,
        weights=reference_weights(keys, positions, scale),
        accumulated=accumulated,
        last_hit=last_hit,
        calibration=calibration,
    )


# Small-parameter instances that exercise each method's pattern at test lengths (T <= 1000). Every
# registered method must have an entry: the contract suite fails for a method without one.
METHOD_EXAMPLES: dict[str, list[str]] = {
    "dense": ["dense", "dense:causal=false"],
    "sliding_window": [
        "sliding_window:window=16",
        "sliding_window:window=5,dilation=3,causal=false",
    ],
    "streaming_llm": ["streaming_llm:sinks=4,window=32"],
    "strided": ["strided:stride=8", "strided:stride=16,mode=fixed,summary=2"],
    "power": ["power:block_size=8,window=2"],
    "neighborhood2d": ["neighborhood2d:height=32,width=32,kernel=5,dilation=2"],
    "per_head_window": ["per_head_window:windows=8/32/128,sinks=2"],
    "quest": [
        "quest:budget=32,page_size=16,dense_layers=0",
        "quest:budget=16,page_size=8,fraction=0.25,dense_layers=0",
    ],
    "oracle_topk": ["oracle_topk:budget=24"],
    "loki": ["loki:budget=24,rank=8"],
    "double_sparsity": ["double_sparsity:budget=24,channels=8"],
    # head-wise methods: an explicit pattern stands in for a calibration file (any model shape);
    # ``write_head_calibration`` makes a synthetic file of a given shape
    "duo_attention": ["duo_attention:pattern=1/0,sinks=4,recent=16"],
    "razor_attention": ["razor_attention:pattern=0/1/0,sinks=2,recent=24"],
    "infllm": ["infllm:budget=64,sinks=4,window=12,block_size=16"],
    "tidal_decode": ["tidal_decode:budget=24"],
    "static_blocks": [
        "static_blocks:block_size=32,n_blocks=32,density=0.3,seed=1",
        "static_blocks:block_size=64,n_blocks=16,density=0.5,causal=false",
    ],
    "snapkv": [
        "snapkv:budget=0.5,window=8,sinks=2,recent=4",
        "snapkv:tokens=24,window=4,sinks=1,recent=2,kernel=3,pooling=avg",
    ],
    "pyramidkv": ["pyramidkv:budget=0.5,window=8,sinks=2,recent=4"],
    "adakv": ["adakv:budget=0.25,window=8,sinks=2,recent=4"],
    "h2o": [
        "h2o:budget=0.5,sinks=2,recent=4",
        "h2o:budget=0.25,sinks=0,recent=8,when=decode,every=4",
    ],
    "tova": ["tova:budget=0.5,sinks=0,recent=4"],
    "knorm": ["knorm:budget=0.5,sinks=2,recent=4"],
    "think": [
        "think:keep=0.5,window=8",
        "think:keep=0.6,budget=0.5,window=8,sinks=2,recent=4,scorer=snapkv:kernel=3;pooling=avg",
        "think:keep=0.75,budget=0.5,sinks=2,recent=4,window=4,when=decode,every=4,scorer=h2o",
    ],
    "qfilters": ["qfilters:budget=0.5,sinks=2,recent=4"],
    "expected_attention": [
        "expected_attention:budget=0.5,window=8,sinks=2,recent=4",
        "expected_attention:budget=0.25,window=4,sinks=2,recent=4,vnorm=false,covariance=false",
    ],
    "attendre": [
        "attendre:budget=0.5,sinks=2,recent=4",
        "attendre:budget=0.25,recent=4,policy=lfu",
    ],
    "block_topk": [
        "block_topk:block_size=16,budget=0.3",
        "block_topk:block_size=32,budget=0.5,sink_blocks=0,local_blocks=2",
    ],
    "block_topp": ["block_topp:block_size=16,budget=0.8"],
    "block_oracle": [
        "block_oracle:block_size=16,budget=0.25",
        "block_oracle:block_size=16,budget=0.9,mode=topp",
    ],
    "sparge": [
        "sparge:block_size=16,budget=0.7,theta=-1",
        "sparge:block_size=16,budget=0.9",
    ],
    "anchor_attention": [
        "anchor_attention:block_size=16,theta=1",
        "anchor_attention:block_size=16,theta=3,budget=0.5,sink_blocks=0",
    ],
    "hip": ["hip:block_size=16,budget=0.25", "hip:block_size=16,budget=0.5,local_blocks=2"],
    "proxy_attn": [
        "proxy_attn:block_size=16,budget=0.5,samples=4",
        "proxy_attn:block_size=16,budget=0.8,proxy_heads=2,sink_blocks=0",
    ],
    "sale": [
        "sale:block_size=16,threshold=0.5",
        "sale:block_size=16,bits=4,threshold=0.2,budget=0.5",
    ],
    "dhsa": [
        "dhsa:block_size=16,chunk_size=16,budget=0.3",
        "dhsa:block_size=16,chunk_size=8,budget=0.5,sink_blocks=0",
    ],
    "minference": [
        "minference:block_size=16,budget=0.1,vertical=0.1,last_q=16",
        "minference:block_size=16,pattern=block,budget=0.3",
        "minference:block_size=16,pattern=ashape,budget=0.2,sink_blocks=0",
    ],
    "flexprefill": [
        "flexprefill:block_size=16,gamma=0.9,tau=0.1",
        "flexprefill:block_size=16,gamma=0.5,tau=1.0",
        "flexprefill:block_size=16,gamma=0.7,tau=0.0",
    ],
    # forward methods (the escape hatch): each its own float64 reference
    "latte": ["latte:n_latents=16,chunk_size=16", "latte:n_latents=4,chunk_size=5,seed=1"],
    "aaren": ["aaren", "aaren:query=fixed", "aaren:query=fixed,seed=1,scan_block=7"],
    "mega": ["mega:chunk_size=16,n_dims=4", "mega:chunk_size=7,gated=false,seed=1"],
    "sse": ["sse:top_k=8,chunk_size=16", "sse:top_k=1,chunk_size=5"],
    "flowformer": ["flowformer:chunk_size=16"],
    "agent_attention": ["agent_attention:n_agents=8"],
    "soft": ["soft:n_landmarks=8", "soft:n_landmarks=16,iterations=8"],
    # hybrids: blocks and segments that the test lengths cross
    "sla": [
        "sla:block_size=8,critical=0.25,marginal=0.5",
        "sla:block_size=16,critical=0.1,marginal=0.9,sink_blocks=0,feature=taylor",
        "sla:block_size=8,critical=0.2,marginal=0.7,feature=elu,combine=shared",
        "sla:block_size=8,critical=0.25,marginal=0.75,feature=elu",
        "sla:block_size=8,critical=0.25,marginal=0.75,points=2",
    ],
    "infini_attention": ["infini_attention:segment=16", "infini_attention:segment=7,gate=1.5"],
    "scatterbrain": [
        "scatterbrain:n_features=16,n_buckets=4",
        "scatterbrain:n_features=8,n_buckets=2,n_rounds=2,seed=1",
        "scatterbrain:n_features=16,sparse=topk_blocks,block_size=16,n_blocks=2",
    ],
    "sea": ["sea:top_k=8,n_features=16", "sea:fraction=0.25,estimator=elu"],
    "combiner": [
        "combiner:region=16",
        "combiner:region=7",
        "combiner:region=4,factorization=logsparse",
        "combiner:region=4,factorization=axial",
    ],
    # feature maps: small feature sizes and windows that the test lengths cross
    "performer": ["performer:features=32,chunk_size=16", "performer:features=16,causal=false"],
    "taylor": [
        "taylor:features=4,window=8,chunk_size=16",
        "taylor:features=16,window=0,normalize=false",
    ],
    "window_linear": ["window_linear:features=4,window=8,chunk_size=16"],
    "hedgehog": ["hedgehog", "hedgehog:features=8,chunk_size=16"],
    "cosine": ["cosine", "cosine:causal=false"],
    "elu_linear": ["elu_linear", "elu_linear:chunk_size=16"],
    "log_normal": ["log_normal", "log_normal:q_std=2.0,k_std=0.5,chunk_size=16"],
    "gated_deltanet": ["gated_deltanet", "gated_deltanet:channelwise=true,chunk_size=16"],
}


def write_head_calibration(
    method: str, n_layers: int, n_kv_heads: int, head_dim: int, path, seed: int = 0
):
    """A synthetic calibration of DuoAttention (``duo_attention``) or RazorAttention
    (``razor_attention``) for a model shape: seeded random head scores and their ranks. Returns the
    path written."""
    from longattn.calibration import Calibration, interleave_ranks, rank_heads

    gen = torch.Generator().manual_seed(seed)
    shape = (n_layers, n_kv_heads)
    if method == "duo_attention":
        gates = torch.rand(shape, generator=gen)
        tensors = {"gates": gates, "rank": rank_heads(gates)}
    elif method == "razor_attention":
        echo, induction = torch.rand(shape, generator=gen), torch.rand(shape, generator=gen)
        tensors = {
            "echo": echo,
            "induction": induction,
            "rank": interleave_ranks(echo, induction, 1 / 15),
        }
    else:
        raise ValueError(f"no synthetic head calibration for method {method!r}")
    cal = Calibration(method, "synthetic", n_layers, n_kv_heads, head_dim, tensors, {"seed": seed})
    return cal.save(path)


# Linear attention: the float64 oracle of ``kernels.linear`` and its derived bound live in
# ``longattn.testing_linear`` (this file's size limit); re-exported here with the other oracles.
from longattn.testing_linear import LinearBound as LinearBound  # noqa: E402
from longattn.testing_linear import assert_linear_close as assert_linear_close  # noqa: E402
from longattn.testing_linear import assert_linear_method_close as assert_linear_method_close  # noqa: E402,E501
from longattn.testing_linear import linear_bound as linear_bound  # noqa: E402
from longattn.testing_linear import linear_reference as linear_reference  # noqa: E402
