"""StreamingLLM positions="cache" (keys and queries at their cache slots) against a float64 reference."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longattn import hf  # noqa: E402
from longattn.method import from_string  # noqa: E402
from longattn.methods import SlidingWindow, StreamingLLM  # noqa: E402
from longattn.methods.intersection import Intersection  # noqa: E402

VOCAB = 96
SINKS, WINDOW = 3, 9
TINY = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=48,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float64, **extra) -> torch.nn.Module:
    config = transformers.LlamaConfig(**{**TINY, **extra})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Llama RoPE (rotate_half) of x [..., T, D] at ``positions`` [T], float64."""
    angle = positions.double()[:, None] * inv_freq.double()  # [T, D/2]
    cos, sin = angle.cos(), angle.sin()
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor, sinks: int, window: int) -> torch.Tensor:
    """The paper's StreamingLLM, token by token, in float64: the query at step t sees the sinks and
    the last ``window`` tokens (itself included), rotated to their slots 0..n-1 in that cache, the
    query at the last slot. Everything but attention reuses the model's own modules. [T, V]"""
    body, cfg = model.model, model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim = cfg.hidden_size // heads
    inv_freq = body.rotary_emb.inv_freq.double()
    raw = [([], []) for _ in body.layers]  # per layer: unrotated keys, values [Hkv, D] per token
    out = []
    for t in range(ids.shape[1]):
        h = body.embed_tokens(ids[:, t])[0]  # [C]
        for layer, (keys, values) in zip(body.layers, raw):
            attn = layer.self_attn
            a = layer.input_layernorm(h)
            q = attn.q_proj(a).view(heads, dim)
            keys.append(attn.k_proj(a).view(kv_heads, dim))
            values.append(attn.v_proj(a).view(kv_heads, dim))
            seen = [i for i in range(t + 1) if i < sinks or t - i < window]
            n = len(seen)
            k = rotate(torch.stack([keys[i] for i in seen], 1), torch.arange(n), inv_freq)
            v = torch.stack([values[i] for i in seen], 1)  # [Hkv, n, D]
            q = rotate(q[:, None], torch.tensor([n - 1]), inv_freq)  # [H, 1, D]
            k = k.repeat_interleave(heads // kv_heads, 0)
            v = v.repeat_interleave(heads // kv_heads, 0)
            weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim), dim=-1)
            h = h + attn.o_proj((weights @ v).reshape(-1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        out.append(model.lm_head(body.norm(h)))
    return torch.stack(out)


def float64_bound(model, reference: torch.Tensor, window: int) -> float:
    """Rounding bound for two float64 evaluations of the same function: each layer's dot products are
    at most n = hidden + intermediate + (sinks + window) * head_dim long, and a length-n reduction is
    off by at most n * eps relative to the sum of magnitudes (gamma_n); that relative error, summed
    over the layers and scaled by the largest logit, bounds the difference (the softmax and the norms
    are 1-Lipschitz in relative terms up to the same order)."""
    cfg = model.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    n = cfg.hidden_size + cfg.intermediate_size + (SINKS + window) * dim
    eps = torch.finfo(torch.float64).eps
    return n * eps * cfg.num_hidden_layers * float(reference.abs().max())


@torch.no_grad()
def streamed(model, ids: torch.Tensor, method: StreamingLLM, chunk: int = 1) -> torch.Tensor:
    with hf.use(model, method) as cache:
        parts = [
            model(ids[:, t : t + chunk], past_key_values=cache).logits[0]
            for t in range(0, ids.shape[1], chunk)
        ]
    return torch.cat(parts)


def test_cache_positions_equal_the_float64_reference_token_by_token():
    model = tiny_llama()
    ids = tokens(1, 40)
    ref = reference_logits(model, ids, SINKS, WINDOW)
    bound = float64_bound(model, ref, WINDOW)
    ours = streamed(model, ids, StreamingLLM(sinks=SINKS, window=WINDOW, positions="cache"))
    err = (ours - ref).abs().max().item()
    assert err <= bound, (err, bound)
    # the test tells the policies apart: original positions leave the sinks at their own distance
    original = streamed(model, ids, StreamingLLM(sinks=SINKS, window=WINDOW))
    # (before the first eviction they differ only by the model's float32 cos and sin, ~1e-8)
    first_eviction = SINKS + WINDOW
    assert (original[first_eviction:] - ref[first_eviction:]).abs().max() > 1e3 * bound


def test_sinks_are_placed_from_a_pristine_copy_in_every_layer():
    model = tiny_llama()
    ids = tokens(1, 30)
    method = StreamingLLM(sinks=SINKS, window=WINDOW, positions="cache")
    with torch.no_grad(), hf.use(model, method) as cache:
        for t in range(30):
            model(ids[:, t : t + 1], past_key_values=cache)
        placed = cache.kv.state["streaming_rope_sinks"]
        for layer in range(model.config.num_hidden_layers):
            pristine, evicted = placed[layer]
            assert evicted == 30 - (SINKS + WINDOW - 1)
            # what the next query sees, plus fewer than a page of dropped keys not compacted yet
            assert SINKS + WINDOW - 1 <= cache.kv.seq_len(layer) < SINKS + WINDOW - 1 + 16
            keys = cache.kv.keys(layer)[:, :, :SINKS]
            inv_freq = model.model.rotary_emb.inv_freq
            expected = rotate(pristine, torch.full((SINKS,), evicted), inv_freq)
            torch.testing.assert_close(keys, expected, rtol=0, atol=1e-14)


def test_chunks_take_the_slots_of_the_chunk():
    """Fed in chunks, a chunk's queries sit at its slots: until the first eviction that is every
    token's own position, so chunked equals token by token there."""
    model = tiny_llama()
    ids = tokens(1, SINKS + WINDOW)
    method = StreamingLLM(sinks=SINKS, window=WINDOW, positions="cache")
    one = streamed(model, ids, method)
    chunked = streamed(model, ids, method, chunk=4)
    torch.testing.assert_close(chunked, one, rtol=0, atol=1e-12)


@torch.no_grad()
def test_feeding_and_generating_past_max_position_embeddings():
    model = tiny_llama(dtype=torch.float32)
    limit = model.config.max_position_embeddings
    ids = tokens(1, 3 * limit)
    method = StreamingLLM(sinks=SINKS, window=WINDOW, positions="cache")
    logits = streamed(model, ids, method, chunk=8)
    assert logits.shape == (3 * limit, VOCAB) and bool(logits.isfinite().all())
    with hf.use(model, method) as cache:
        out = model.generate(
            ids[:, : limit - 4], max_new_tokens=12, do_sample=False, past_key_values=cache
        )
        assert out.shape[1] == limit + 8
        page = cache.kv.page_size  # dropped keys are compacted a page at a time
        assert all(cache.kv.seq_len(i) < SINKS + WINDOW - 1 + page for i in range(2))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        streamed(model, ids, StreamingLLM(sinks=SINKS, window=WINDOW), chunk=8)


def test_policy_values_and_strings():
    assert StreamingLLM().positions == "original"
    method = from_string("streaming_llm:sinks=2,window=8,positions=cache")
    assert method == StreamingLLM(sinks=2, window=8, positions="cache")
    assert from_string(method.describe()) == method
    for bad in ("slots", "", "Cache"):
        with pytest.raises(ValueError, match="positions"):
            StreamingLLM(positions=bad)


@torch.no_grad()
def test_refusals():
    model = tiny_llama(dtype=torch.float32)
    cache_llm = StreamingLLM(sinks=2, window=8, positions="cache")
    wrapped = Intersection(cache_llm, SlidingWindow(window=8))
    with (
        pytest.raises(ValueError, match="StreamingLLM's / InfiniAttention's own policies"),
        hf.use(model, wrapped),
    ):
        pass
    dynamic = tiny_llama(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope_type is 'dynamic'"), hf.use(dynamic, cache_llm):
        pass
    ids = tokens(2, 12)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with hf.use(model, cache_llm) as cache, pytest.raises(ValueError, match="unpadded"):
        model(ids, attention_mask=mask, past_key_values=cache)
    with hf.use(model, cache_llm), pytest.raises(ValueError, match="use\\(\\) block's cache"):
        model(ids, use_cache=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_rotation_rounds_as_the_half_split_formula(dtype):
    """``Rotation`` (x * [c, c] + roll(x) * [-s, s]) gives the bits of x1 c - x2 s, x2 c + x1 s."""
    from longattn.integrations.rope import Rotation

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 16, generator=gen, dtype=torch.float64).to(dtype)
    angle = torch.rand(2, 5, 8, generator=gen, dtype=torch.float64) * 1e3
    cos, sin = angle.cos(), angle.sin()
    work = torch.promote_types(dtype, torch.float32)
    c, s = cos[:, None].to(work), sin[:, None].to(work)
    x1, x2 = x.to(work).chunk(2, dim=-1)
    expected = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(dtype)
    got = Rotation.of(cos, sin, dtype).apply(x)
    assert got.dtype == dtype
    assert torch.equal(got, expected)
    with pytest.raises(TypeError, match="applied to a"):
        Rotation.of(cos, sin, dtype).apply(x.double() if dtype != torch.float64 else x.float())


def test_the_correction_is_built_once_per_positions_and_rebuilt_when_they_change():
    from longattn.integrations.rope import Corrections, RopeFrame

    frame = RopeFrame(1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16))
    memo = Corrections(frame)
    model_pos, pos = torch.arange(5, 9)[None], torch.arange(5, 9)[None]
    first = memo(model_pos, pos, torch.float32)
    assert memo(model_pos, pos, torch.float32) is first  # same tensors: reused
    assert memo(model_pos, pos, torch.bfloat16) is not first  # another dtype: rebuilt
    assert memo(model_pos.clone(), pos, torch.float32) is not first  # other tensors: rebuilt
    again = memo(model_pos, pos, torch.float32)
    pos += 1000  # changed in place: the version counter moves, so it is rebuilt
    moved = memo(model_pos, pos, torch.float32)
    assert moved is not again
    x = torch.randn(1, 2, 4, 16)
    assert torch.equal(moved.apply(x), frame.correct(x, model_pos, pos))
    assert not torch.equal(moved.apply(x), again.apply(x))
