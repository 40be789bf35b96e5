"""InfiniAttention positions="segment" (every token rotated at its offset inside its segment)
through ``hf.use``, against a float64 reference, past the model's positions."""

import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from longattn import hf  # noqa: E402
from longattn.method import from_string  # noqa: E402
from longattn.methods import InfiniAttention  # noqa: E402
from tests.test_streaming_positions import TINY, rotate, tiny_llama, tokens  # noqa: E402

LIMIT, SEGMENT = TINY["max_position_embeddings"], 16


def sigma(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.elu(x) + 1


@torch.no_grad()
def reference_logits(model, ids: torch.Tensor, segment: int, gate: float) -> torch.Tensor:
    """Infini-attention token by token in float64, every token rotated at ``position mod
    segment``: a query's causal softmax over its own segment's keys, and (after the first
    segment) the memory ``sigma(q) M / sigma(q) z`` of every earlier segment's keys and values,
    mixed by ``g = sigmoid(gate)``. Everything but attention reuses the model's modules. [T, V]"""
    body, cfg = model.model, model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    dim, group = cfg.hidden_size // heads, heads // kv_heads
    inv_freq = body.rotary_emb.inv_freq.double()
    g = 1 / (1 + math.exp(-gate))
    raw = [([], []) for _ in body.layers]  # per layer: rotated keys, values [Hkv, D] per token
    out = []
    for t in range(ids.shape[1]):
        h = body.embed_tokens(ids[:, t])[0]
        start = t // segment * segment
        at = torch.tensor([t % segment])
        for layer, (keys, values) in zip(body.layers, raw):
            attn = layer.self_attn
            a = layer.input_layernorm(h)
            q = rotate(attn.q_proj(a).view(heads, 1, dim), at, inv_freq)  # [H, 1, D]
            keys.append(rotate(attn.k_proj(a).view(kv_heads, 1, dim), at, inv_freq)[:, 0])
            values.append(attn.v_proj(a).view(kv_heads, dim))
            k = torch.stack(keys[start:], 1).repeat_interleave(group, 0)  # [H, n, D]
            v = torch.stack(values[start:], 1).repeat_interleave(group, 0)
            mixed = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(dim), -1) @ v  # [H, 1, D]
            if start:
                k_mem = sigma(torch.stack(keys[:start], 1)).repeat_interleave(group, 0)
                v_mem = torch.stack(values[:start], 1).repeat_interleave(group, 0)
                memory, norm = k_mem.transpose(1, 2) @ v_mem, k_mem.sum(1)  # [H, D, D], [H, D]
                phi = sigma(q)
                read = (phi @ memory) / (phi @ norm[:, :, None])
                mixed = g * read + (1 - g) * mixed
            h = h + attn.o_proj(mixed.reshape(-1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        out.append(model.lm_head(body.norm(h)))
    return torch.stack(out)


def float64_bound(model, reference: torch.Tensor) -> float:
    """Two float64 evaluations of the same function: each layer's reductions are at most n =
    hidden + intermediate + (segment + length) * head_dim long (the memory sums every earlier
    key), a length-n sum is within gamma_n of its magnitude; summed over the layers, scaled by the
    largest logit."""
    cfg = model.config
    dim = cfg.hidden_size // cfg.num_attention_heads
    n = cfg.hidden_size + cfg.intermediate_size + (SEGMENT + reference.shape[0]) * dim
    return n * torch.finfo(torch.float64).eps * cfg.num_hidden_layers * float(reference.abs().max())


@torch.no_grad()
def streamed(model, ids: torch.Tensor, method: InfiniAttention, chunk: int) -> torch.Tensor:
    with hf.use(model, method) as cache:
        parts = [
            model(ids[:, t : t + chunk], past_key_values=cache).logits[0]
            for t in range(0, ids.shape[1], chunk)
        ]
    return torch.cat(parts)


@pytest.mark.parametrize("chunk", [1, 5, 16])
def test_segment_positions_equal_the_float64_reference_past_the_models_positions(chunk):
    model = tiny_llama()
    ids = tokens(1, LIMIT + 2 * SEGMENT + 3)  # past max_position_embeddings
    method = InfiniAttention(segment=SEGMENT, gate=0.0, positions="segment")
    ref = reference_logits(model, ids, SEGMENT, 0.0)
    bound = float64_bound(model, ref)
    err = (streamed(model, ids, method, chunk) - ref).abs().max().item()
    assert err <= bound, (err, bound)


@torch.no_grad()
def test_one_forward_without_the_cache_equals_the_reference():
    model = tiny_llama()
    ids = tokens(1, LIMIT + SEGMENT)
    method = InfiniAttention(segment=SEGMENT, gate=0.0, positions="segment")
    ref = reference_logits(model, ids, SEGMENT, 0.0)
    with hf.use(model, method):
        whole = model(ids, use_cache=False).logits[0]
    assert (whole - ref).abs().max().item() <= float64_bound(model, ref)


@torch.no_grad()
def test_the_policies_differ_after_the_first_segment_and_original_stops_at_the_limit():
    model = tiny_llama()
    ids = tokens(1, LIMIT)
    ref = reference_logits(model, ids, SEGMENT, 0.0)
    bound = float64_bound(model, ref)
    original = streamed(model, ids, InfiniAttention(segment=SEGMENT, gate=0.0), chunk=8)
    # the first segment: the same rotations up to the model's float32 angles
    assert (original[:SEGMENT] - ref[:SEGMENT]).abs().max() < 1e-5
    # later: the memory's keys (and the local pairs' angles) are rotated elsewhere
    assert (original[SEGMENT:] - ref[SEGMENT:]).abs().max() > 1e3 * bound
    with pytest.raises(ValueError, match="max_position_embeddings"):
        streamed(model, tokens(1, LIMIT + 8), InfiniAttention(segment=SEGMENT), chunk=8)


def test_policy_values_strings_and_refusals():
    assert InfiniAttention().positions == "original"
    method = from_string("infini_attention:segment=16,positions=segment")
    assert method == InfiniAttention(segment=16, positions="segment")
    assert from_string(method.describe()) == method
    for bad in ("cache", "", "Segment"):
        with pytest.raises(ValueError, match="positions"):
            InfiniAttention(positions=bad)
    model = tiny_llama(dtype=torch.float32)
    ids = tokens(1, 12)
    mask = torch.ones_like(ids).repeat(2, 1)
    mask[1, :3] = 0
    with torch.no_grad(), hf.use(model, method) as cache:
        with pytest.raises(ValueError, match="unpadded"):
            model(ids.repeat(2, 1), attention_mask=mask, past_key_values=cache)
    with pytest.raises(ValueError, match="segment=64 is longer"):
        with hf.use(model, InfiniAttention(segment=64, positions="segment")):
            pass
