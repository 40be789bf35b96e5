"""Shared test and benchmark factories: inputs, the oracle comparison and its derived error bound."""

from __future__ import annotations

import dataclasses

import torch

from longattn.api import make_call, visible_mask
from longattn.kernels.reference import reference_attention
from longattn.method import Method
from longattn.types import AttnOutput, DecodeSelection


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


def error_bound(eager: torch.Tensor, ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """``2 * max|eager - ref64| + 2 * eps(dtype) * max|ref64|``: what a fast path may deviate by."""
    eps = torch.finfo(dtype).eps
    scale = ref64.abs().max().item() if ref64.numel() else 0.0
    err = (eager.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    return 2.0 * err + 2.0 * eps * scale


def assert_attention_close(
    result: AttnOutput | torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    method: Method | None = None,
    **call_kwargs,
) -> float:
    """Assert that ``result`` is within the derived bound of ``method``'s float64 oracle.

    The bound is ``2 * max|eager - ref64| + 2 * eps(dtype) * max|ref64|`` where ``eager`` is the oracle
    run in the inputs' dtype. ``lse`` (when present) is checked the same way. Returns the output error.
    """
    out = result.out if isinstance(result, AttnOutput) else result
    if isinstance(result, AttnOutput) and isinstance(result.state, DecodeSelection):
        call_kwargs.setdefault("selection", result.state)  # the reference uses the same selection
    ref64 = oracle(q, k, v, method, **call_kwargs)
    eager = oracle(q, k, v, method, dtype=q.dtype, **call_kwargs)
    if out.shape != ref64.out.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref64.out.shape)}")
    if out.dtype != q.dtype:
        raise AssertionError(f"output dtype {out.dtype} != input dtype {q.dtype}")
    err = (out.double() - ref64.out).abs().max().item() if out.numel() else 0.0
    bound = error_bound(eager.out, ref64.out, q.dtype)
    if not err <= bound:
        raise AssertionError(f"max|out - ref64| = {err:.3e} exceeds the bound {bound:.3e}")
    lse = result.lse if isinstance(result, AttnOutput) else None
    if lse is not None and lse.numel():
        ref_lse, eager_lse = ref64.lse, eager.lse
        inf_ref = torch.isneginf(ref_lse)
        if not torch.equal(torch.isneginf(lse), inf_ref):
            raise AssertionError("lse is -inf on different rows than the reference")
        finite = ~inf_ref
        lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
        lse_bound = error_bound(eager_lse[finite], ref_lse[finite], torch.float32)
        if not lse_err <= lse_bound:
            raise AssertionError(
                f"max|lse - ref64| = {lse_err:.3e} exceeds the bound {lse_bound:.3e}"
            )
    return err


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
    "infllm": ["infllm:budget=64,sinks=4,window=12,block_size=16"],
    "tidal_decode": ["tidal_decode:budget=24"],
    "static_blocks": [
        "static_blocks:block_size=32,n_blocks=32,density=0.3,seed=1",
        "static_blocks:block_size=64,n_blocks=16,density=0.5,causal=false",
    ],
}
