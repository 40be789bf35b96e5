"""BlockIndex construction and validation, and the sparse kernel on prebuilt indices."""

import pytest
import torch

from longattn import attention, methods
from longattn.kernels.sparse import sparse_attention
from longattn.testing import assert_attention_close, check_against_reference, make_qkv
from longattn.types import BlockIndex


def _causal(b, h, qp, kp):
    return kp <= qp


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("per_head", [False, True])
def test_prebuilt_index_matches_dense(dtype, per_head):
    n, bs = 6, 32
    gen = torch.Generator().manual_seed(2)
    layout = (torch.rand(1, 4 if per_head else 1, n, n, generator=gen) < 0.4).tril()
    layout |= torch.eye(n, dtype=torch.bool)
    index = BlockIndex.from_block_mask(
        layout, bs, partial=torch.eye(n, dtype=torch.bool), q_len=180, kv_len=180
    )
    q, k, v = make_qkv(2, 4, 2, 180, 180, 32, dtype=dtype, seed=1)
    got = sparse_attention(q, k, v, index, scale=0.2, mask_fn=_causal)
    check_against_reference(got, q, k, v, index.to_dense(_causal), 0.2)


def test_layout_round_trip():
    layout = torch.rand(2, 3, 5, 7) < 0.5
    visited, partial = BlockIndex.from_block_mask(layout, 16).layout()
    assert torch.equal(visited, layout) and not partial.any()


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda kv, c: (kv.fill_(9), c), "in \\[0, 4\\)"),
        (lambda kv, c: (kv.flip(-1), c), "strictly increasing"),
        (lambda kv, c: (kv.fill_(0), c), "strictly increasing"),
        (lambda kv, c: (kv, c + 9), "counts"),
    ],
)
def test_bad_index_is_a_clear_error(edit, words):
    index = BlockIndex.from_block_mask(torch.ones(4, 4, dtype=torch.bool), 16)
    kv, counts = edit(index.kv_blocks.clone(), index.counts.clone())
    bad = BlockIndex(kv.contiguous(), counts, index.partial, 16, 64, 64)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 8)
    with pytest.raises(ValueError, match=words):
        sparse_attention(q, k, v, bad, scale=0.1)


def test_index_shape_mismatch_is_a_clear_error():
    index = BlockIndex.from_block_mask(torch.ones(1, 3, 4, 4, dtype=torch.bool), 16)
    q, k, v = make_qkv(1, 2, 2, 64, 64, 8)
    with pytest.raises(ValueError, match="does not fit"):
        sparse_attention(q, k, v, index, scale=0.1)
    with pytest.raises(ValueError, match="q_len=64"):
        sparse_attention(q[:, :, :40], k, v, index, scale=0.1)


def test_static_blocks_runs_on_the_sparse_kernel_with_padding():
    layout = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0)) < 0.6
    method = methods.StaticBlocks(layout, block_size=64)
    q, k, v = make_qkv(2, 4, 2, 256, 256, 32, seed=4)
    pos = torch.arange(256).repeat(2, 1)
    pos[0, :50] = -1
    res = attention(q, k, v, method=method, impl="sparse", q_positions=pos, kv_positions=pos)
    assert_attention_close(res, q, k, v, method, q_positions=pos, kv_positions=pos)


def test_auto_builds_the_block_index_once_per_call(monkeypatch):
    from longattn import api

    built = []
    real = api.block_index_from_mask

    def counting(*args):
        built.append(1)
        return real(*args)

    monkeypatch.setattr(api, "block_index_from_mask", counting)
    q, k, v = make_qkv(1, 2, 2, 512, 512, 16, seed=1)
    api.attention(q, k, v, method="sliding_window:window=128")
    assert len(built) == 1
