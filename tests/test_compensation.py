"""Compensation tokens (``Evict.compensate``, RazorAttention's Eq. 4-5; ``longattn.cache_summary``):
an eviction folds each head's dropped tokens into one token (mean key, mean value) weighed by the
number of tokens it stands for."""

import dataclasses

import pytest
import torch

from longattn import KVCache, attention
from longattn.cache_channels import gather_channels, gather_query_channels
from longattn.method import from_string
from longattn.methods import RazorAttention
from longattn.testing import check_against_reference, with_compensation

IMPLS = ["decode_cpp", "decode", "reference", "tiled", "sparse", "sparse_cpp"]
STREAMING = "razor_attention:pattern=0/1,sinks=2,recent=8,when=prefill"


def _qkv(t=60, batch=1, heads=4, n_kv=2, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, t, dim), (batch, n_kv, t, dim), (batch, n_kv, t, dim)]
    return [torch.randn(*s, generator=g).to(dtype) for s in shapes]


def _visible_held(cache, q_pos, length, group):
    pos = cache.head_positions(0)  # [B, Hkv, T]
    held = torch.zeros(*pos.shape[:2], length + 1, dtype=torch.bool)
    held.scatter_(-1, torch.where(pos >= 0, pos, length), True)
    causal = torch.arange(length) <= q_pos
    return (held[..., :length] & causal).repeat_interleave(group, dim=1)[:, :, None, :]


def _step(q, k, v, t, method, cache, impl="auto"):
    s = slice(t, t + 1)
    return attention(q[:, :, s], k[:, :, s], v[:, :, s], method=method, cache=cache, impl=impl)


def test_identical_dropped_tokens_give_exactly_the_full_attention():
    """When every token a head drops is the same (key, value), the compensation token stands for
    them exactly: the compressed cache answers like the full one; without it, it does not."""
    q, k, v = _qkv(t=41)
    k[:, :, 2:32], v[:, :, 2:32] = k[:, :, 2:3], v[:, :, 2:3]  # the tokens the window drops
    full = attention(q[:, :, -1:], k, v, q_positions=torch.tensor([40]))
    for compensate, close in ((True, True), (False, False)):
        method = dataclasses.replace(from_string(STREAMING), compensate=compensate)
        cache = KVCache(1, page_size=4)
        attention(q[:, :, :40], k[:, :, :40], v[:, :, :40], method=method, cache=cache)
        out = _step(q, k, v, 40, method, cache)
        assert cache.head_lengths(0)[0, 0] < 41  # the streaming head dropped tokens
        error = (out.out - full.out).abs().max().item()
        assert (error < 1e-5) is close, (compensate, error)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_impl_attends_the_compensation_token_like_the_oracle(impl, dtype):
    q, k, v = _qkv(t=64, batch=2, dtype=dtype)
    method = from_string(STREAMING)
    cache = KVCache(1, page_size=4)
    attention(q[:, :, :56], k[:, :, :56], v[:, :, :56], method=method, cache=cache)
    for t in range(56, 64):
        out = _step(q, k, v, t, method, cache, impl="auto" if t == 56 else impl)
        summary = cache.summary(0)
        assert summary is not None and summary.count[:, 1].eq(0).all()  # retrieval head: none
        assert summary.count[:, 0].eq(56 - 2 - 8).all()  # the streaming head: all but sinks+recent
        visible = _visible_held(cache, t, t + 1, group=2)
        kx, vx, vis = with_compensation(k[:, :, : t + 1], v[:, :, : t + 1], visible, summary)
        check_against_reference(out, q[:, :, t : t + 1], kx, vx, vis, 16**-0.5)


def test_repeated_compressions_keep_the_mean_of_every_dropped_token():
    """``when="decode"`` compresses every ``every`` steps: the token stays the mean of all tokens
    dropped so far and its count their number."""
    q, k, v = _qkv(t=80, dtype=torch.float64)
    method = from_string("razor_attention:pattern=0/1,sinks=2,recent=8,when=decode,every=4")
    cache = KVCache(1, page_size=4)
    attention(q[:, :, :50], k[:, :, :50], v[:, :, :50], method=method, cache=cache)
    for t in range(50, 80):
        _step(q, k, v, t, method, cache)
    held = cache.head_positions(0)[0, 0]
    gone = sorted(set(range(80)) - set(held[held >= 0].tolist()))
    summary = cache.summary(0)
    assert int(summary.count[0, 0]) == len(gone) > 50 - 10
    torch.testing.assert_close(summary.keys[0, 0], k[0, 0, gone].mean(0))
    torch.testing.assert_close(summary.values[0, 0], v[0, 0, gone].mean(0))


def test_bytes_count_the_tokens_and_a_refused_call_restores_them():
    q, k, v = _qkv(t=50)
    method = from_string(STREAMING)
    cache = KVCache(1, page_size=4)
    attention(q[:, :, :40], k[:, :, :40], v[:, :, :40], method=method, cache=cache)
    used, held = cache.nbytes(), cache.capacity_nbytes()
    assert cache.summary(0) is None
    with pytest.raises(ValueError):  # due to compress, then refused: nothing may change
        attention(q[:, :, 40:41], k[:, :, 40:41], v[:, :, 40:42], method=method, cache=cache)
    assert cache.summary(0) is None and cache.nbytes() == used and cache.capacity_nbytes() == held
    _step(q, k, v, 40, method, cache)
    summary = cache.summary(0)
    token_bytes = summary.keys.numel() * 4 + summary.values.numel() * 4 + summary.count.numel() * 8
    slots = int(cache.head_lengths(0).amax())
    assert cache.nbytes() == 2 * 1 * 2 * slots * 16 * 4 + token_bytes


def test_the_field_parses_and_refuses_a_non_bool():
    assert from_string("razor_attention:pattern=1,compensate=false").compensate is False
    assert RazorAttention(pattern=(1,)).compensate is True  # the paper's default
    assert from_string("snapkv").compensate is False  # other scorers: opt in
    with pytest.raises(TypeError, match="compensate"):
        RazorAttention(pattern=(1,), compensate=1)


def test_a_channel_pruned_layer_scores_its_compensation_token_on_the_kept_channels():
    """ThinK with ``compensate``: the token's key keeps the channels the layer keeps, so each
    decode step is the oracle over the held keys' kept channels plus the token."""
    q, k, v = _qkv(t=64)
    method = from_string("think:keep=0.5,scorer=snapkv,budget=0.5,compensate=true")
    cache = KVCache(1, page_size=4)
    attention(q[:, :, :56], k[:, :, :56], v[:, :, :56], method=method, cache=cache)
    for t in range(56, 64):
        out = _step(q, k, v, t, method, cache)
        channels, summary = cache.key_channels(0), cache.summary(0)
        assert channels is not None and channels.shape[-1] == 8
        assert summary is not None and summary.keys.shape[-1] == 8 and summary.count.gt(0).all()
        visible = _visible_held(cache, t, t + 1, group=2)
        kept = gather_channels(k[:, :, : t + 1], channels)
        kx, vx, vis = with_compensation(kept, v[:, :, : t + 1], visible, summary)
        q_kept = gather_query_channels(q[:, :, t : t + 1], channels)
        check_against_reference(out, q_kept, kx, vx, vis, 16**-0.5)
