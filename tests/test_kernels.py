"""Kernel-level checks: lse merging, SDPA alignment, the tiled executor's memory."""

import torch

from longattn.bench.common import peak_extra_mib
from longattn.kernels.merge import merge_partials
from longattn.kernels.reference import reference_attention
from longattn.kernels.sdpa import sdpa_attention
from longattn.kernels.tiled import tiled_attention
from longattn.testing import make_qkv


def test_merge_of_disjoint_key_sets_equals_the_whole():
    q, k, v = make_qkv(2, 4, 2, 30, 90, 16, dtype=torch.float64)
    whole = reference_attention(q, k, v, None, 0.25)
    parts = [
        reference_attention(q, k[:, :, s], v[:, :, s], None, 0.25)
        for s in (slice(0, 10), slice(10, 70), slice(70, 90))
    ]
    out, lse = merge_partials([p.out for p in parts], [p.lse for p in parts])
    torch.testing.assert_close(out, whole.out, rtol=0, atol=1e-13)
    torch.testing.assert_close(lse, whole.lse, rtol=0, atol=1e-13)


def test_merge_keeps_empty_rows_empty():
    out = torch.ones(1, 1, 3, 4)
    lse = torch.tensor([[[0.0, -torch.inf, 1.0]]])
    empty = torch.full_like(lse, -torch.inf)
    merged, merged_lse = merge_partials([out, out * 2], [lse, empty])
    assert torch.equal(merged[0, 0, 1], torch.zeros(4)) and torch.isneginf(merged_lse[0, 0, 1])
    torch.testing.assert_close(merged[0, 0, 0], torch.ones(4))


def test_sdpa_causal_is_aligned_bottom_right():
    q, k, v = make_qkv(1, 4, 1, 7, 20, 16, dtype=torch.float64)
    visible = torch.arange(20).view(1, -1) <= torch.arange(13, 20).view(-1, 1)
    want = reference_attention(q, k, v, visible, 0.25)
    got = sdpa_attention(q, k, v, causal=True, scale=0.25)
    torch.testing.assert_close(got.out, want.out, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=1e-12)


def test_tiled_extra_memory_is_linear_not_quadratic():
    """At T=4096 the score matrix would be 512 MiB; the tiled executor stays far below it."""
    length, heads = 4096, 8
    q, k, v = make_qkv(1, heads, heads, length, length, 64, seed=1)
    pos = torch.arange(length).view(1, -1)
    peak = peak_extra_mib(
        lambda: tiled_attention(
            q, k, v, scale=0.125, q_pos=pos, kv_pos=pos, mask_fn=lambda b, h, qp, kp: kp <= qp
        )
    )
    scores_mib = heads * length * length * 4 / 2**20
    assert peak is not None and peak < scores_mib / 4, f"peak {peak:.0f} MiB"
