"""The hybrids (SLA, InfiniAttention) through ``longattn.hf.use`` on a tiny random-init Llama
(no download): a 128-token prefill, then decode from the carried state equals one forward."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
from longattn import hf  # noqa: E402
from longattn.methods import SLA, InfiniAttention  # noqa: E402


def tiny_llama(positions: int = 256) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=positions)  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(torch.float64).eval()


@torch.no_grad()
@pytest.mark.parametrize(
    "method",
    [SLA(block_size=16, critical=0.25, marginal=0.5), InfiniAttention(segment=48, gate=0.0)],
    ids=str,
)
def test_prefill_128_then_decode_equals_one_forward(method):
    model = tiny_llama()
    ids = torch.randint(3, 64, (2, 136), generator=torch.Generator().manual_seed(1))
    with hf.use(model, method):
        whole = model(ids, use_cache=False).logits
    with hf.use(model, method) as cache:
        steps = [model(ids[:, :128], past_key_values=cache, use_cache=True).logits]
        for t in range(128, 136):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=1e-10, atol=1e-10)
    with hf.use(model, "dense"):
        dense = model(ids, use_cache=False).logits
    assert (whole - dense).abs().max() > 1e-6  # the method really acts


@torch.no_grad()
def test_sla_with_every_block_critical_is_the_models_own_attention():
    model = tiny_llama()
    ids = torch.randint(3, 64, (1, 128), generator=torch.Generator().manual_seed(2))
    own = model(ids).logits
    with hf.use(model, SLA(block_size=16, critical=1.0, marginal=0.0)):
        ours = model(ids).logits
    torch.testing.assert_close(ours, own, rtol=1e-9, atol=1e-9)


def test_a_segment_longer_than_the_models_positions_is_refused():
    model = tiny_llama(positions=64)
    with pytest.raises(ValueError, match="segment=128.*64 positions"):
        with hf.use(model, InfiniAttention(segment=128)):
            pass


@pytest.mark.model
@torch.no_grad()
@pytest.mark.parametrize(
    "method",
    [SLA(block_size=16, critical=0.25, marginal=0.5), InfiniAttention(segment=64)],
    ids=str,
)
def test_the_real_model_runs_128_tokens_and_decodes_from_the_state(real_model, method):
    """The embedded model at 128 tokens: finite logits, and a prompt then single steps through
    the cache give the one-pass logits (float32, other summation orders through 30 layers: within
    1e-3 of logits of magnitude ~10, as the existing real-model checks hold dense to 1e-4)."""
    model, tok = real_model
    ids = tok("The capital of France is Paris. " * 30, return_tensors="pt").input_ids[:, :132]
    with hf.use(model, method):
        whole = model(ids, use_cache=False).logits
    with hf.use(model, method) as cache:
        steps = [model(ids[:, :128], past_key_values=cache, use_cache=True).logits]
        for t in range(128, 132):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits)
    assert torch.isfinite(whole).all()
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, rtol=0, atol=1e-3)


@torch.no_grad()
def test_the_caches_bytes_count_the_recurrent_state():
    """Infini-attention holds its memory, normaliser and open segment per layer: those are the
    cache's used bytes (and its capacity), not 0."""
    model = tiny_llama()  # float64, 2 layers, 2 KV heads of 16 dims
    ids = torch.randint(3, 64, (1, 40), generator=torch.Generator().manual_seed(3))
    with hf.use(model, InfiniAttention(segment=16)) as cache:
        model(ids, past_key_values=cache)
        kv_heads, dim, held = 2, 16, 40 % 16
        per_layer = kv_heads * (dim * dim + dim + 2 * held * dim) * 8  # memory, norm, k and v
        assert cache.nbytes() == cache.capacity_nbytes() == 2 * per_layer
