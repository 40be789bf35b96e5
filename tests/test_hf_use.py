"""longattn.hf.use on tiny random-init models of every supported family (no download, seeded)."""

import inspect

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

from longattn import hf  # noqa: E402
from longattn.methods import Dense, SlidingWindow, StreamingLLM  # noqa: E402

VOCAB = 128
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=VOCAB,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
# Windows of 8 are shorter than the test sequences, so the models' own sliding windows really act.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 16,
            "sliding_window": 8,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A seeded random-init causal LM of ``family`` with ``sdpa`` as its own attention."""
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **extra)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).eval()


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=gen)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request):
    return tiny_model(request.param)


@torch.no_grad()
def test_dense_logits_equal_the_models_own_sdpa(model):
    ids = tokens(2, 40)
    own = model(ids).logits
    with hf.use(model, Dense()):
        ours = model(ids).logits
    assert (ours - own).abs().max().item() <= 1e-4


@torch.no_grad()
def test_streaming_llm_with_a_window_covering_the_input_equals_dense(model):
    ids = tokens(1, 40)
    with hf.use(model, Dense()):
        dense = model(ids).logits
    with hf.use(model, StreamingLLM(sinks=4, window=40)):
        streaming = model(ids).logits
    torch.testing.assert_close(streaming, dense, atol=1e-5, rtol=0)


@torch.no_grad()
def test_the_layers_own_sliding_window_is_kept_under_any_method(model):
    """A method with a wider window than the model's must not widen the model's sliding layers."""
    ids = tokens(1, 40)
    with hf.use(model, Dense()):
        dense = model(ids).logits
    with hf.use(model, SlidingWindow(window=64)):
        wide = model(ids).logits
    torch.testing.assert_close(wide, dense, atol=1e-5, rtol=0)


@torch.no_grad()
def test_left_padded_rows_equal_the_unpadded_rows(model):
    long, short = tokens(1, 40, seed=2)[0], tokens(1, 29, seed=3)[0]
    pad = long.numel() - short.numel()
    ids = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    for method in (Dense(), StreamingLLM(sinks=2, window=8)):
        with hf.use(model, method):
            batched = model(ids, attention_mask=mask).logits
            alone = [model(row[None]).logits[0] for row in (long, short)]
        torch.testing.assert_close(batched[0], alone[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(batched[1, pad:], alone[1], atol=1e-4, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("method", [Dense(), StreamingLLM(sinks=2, window=8)], ids=str)
def test_prefill_then_decode_step_by_step_equals_one_forward(model, method):
    ids = tokens(2, 36)
    with hf.use(model, method) as cache:
        full = model(ids).logits
        steps = [model(ids[:, :28], past_key_values=cache).logits[:, -1]]
        for t in range(28, ids.shape[1]):
            steps.append(model(ids[:, t : t + 1], past_key_values=cache).logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1), full[:, 27:-1], atol=1e-4, rtol=0)


@torch.no_grad()
def test_the_cache_really_shrinks_under_streaming_llm(model):
    ids = tokens(2, 40)
    n_layers = model.config.num_hidden_layers
    with hf.use(model, Dense()) as cache:
        model(ids, past_key_values=cache)
        dense = [cache.kv.seq_len(layer) for layer in range(n_layers)]
    with hf.use(model, StreamingLLM(sinks=2, window=8)) as cache:
        model(ids[:, :32], past_key_values=cache)
        for t in range(32, 40):
            model(ids[:, t : t + 1], past_key_values=cache)
        held = [cache.kv.seq_len(layer) for layer in range(n_layers)]
        page = cache.kv.page_size
        assert cache.get_seq_length() == 40
        assert all(cache.kv.n_seen(layer) == 40 for layer in range(n_layers))
    # a layer with its own window of 8 keeps only that window even under Dense
    default = getattr(model.config, "sliding_window", None)
    windows = [getattr(d.self_attn, "sliding_window", default) for d in model.model.layers]
    own = [w if w is not None and w < 40 else None for w in windows]
    assert dense == [40 if w is None else w - 1 for w in own]
    # what the next query sees (2 sinks + 7), plus fewer than a page of keys dropped, not yet evicted
    assert all(n < 2 + 8 - 1 + page for n in held) and max(held) < 40, held


@torch.no_grad()
def test_an_eviction_method_compresses_per_head_inside_generate(model):
    """Nothing evicted (budget 1) is the model's own greedy output; a quarter kept shrinks each
    full-attention layer's storage to the budget at the first decode step, head by head."""
    prompt = tokens(1, 64)
    own = model.generate(prompt, max_new_tokens=4, do_sample=False)
    with hf.use(model, "snapkv:budget=1.0,window=8") as cache:
        ours = model.generate(prompt, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert torch.equal(ours, own)
    with hf.use(model, "snapkv:budget=0.25,window=8,sinks=2,recent=4") as cache:
        model.generate(prompt, max_new_tokens=4, do_sample=False, past_key_values=cache)
        default = getattr(model.config, "sliding_window", None)
        windows = [getattr(d.self_attn, "sliding_window", default) for d in model.model.layers]
        for layer, window in enumerate(windows):
            if window is not None and window < 64:
                continue  # a windowed layer keeps its own window
            lengths = cache.kv.head_lengths(layer)
            assert int(lengths.max()) <= 16 + 3  # ceil(0.25 * 64) + the decoded tokens
            assert cache.kv.capacity(layer) <= 32


@torch.no_grad()
def test_generate_equals_the_models_own_greedy_output(model):
    prompt = tokens(1, 12)
    own = model.generate(prompt, max_new_tokens=6, do_sample=False)
    with hf.use(model, Dense()) as cache:
        ours = model.generate(prompt, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert torch.equal(ours, own)


@torch.no_grad()
def test_generate_with_left_padding_equals_per_row_generation(model):
    long, short = tokens(1, 12, seed=4)[0], tokens(1, 8, seed=5)[0]
    ids = torch.stack([long, torch.cat([torch.zeros(4, dtype=torch.long), short])])
    mask = (torch.arange(12) >= torch.tensor([[0], [4]])).long()
    with hf.use(model, StreamingLLM(sinks=2, window=8)) as cache:
        batched = model.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False, past_key_values=cache
        )
    with hf.use(model, StreamingLLM(sinks=2, window=8)) as cache:
        alone = model.generate(
            short[None], max_new_tokens=5, do_sample=False, past_key_values=cache
        )
    assert torch.equal(batched[1, 4:], alone[0])


def test_everything_is_restored_on_exit_and_on_exception():
    model = tiny_model("llama")
    before_attn = set(AttentionInterface._global_mapping)
    before_mask = set(AttentionMaskInterface._global_mapping)
    with hf.use(model, "streaming_llm:sinks=2,window=8"):
        assert model.config._attn_implementation.startswith("longattn")
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="boom"), hf.use(model, Dense()):
        raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert set(AttentionInterface._global_mapping) == before_attn
    assert set(AttentionMaskInterface._global_mapping) == before_mask
    for module in model.modules():  # no forward was ever replaced
        assert "forward" not in vars(module)


def test_soft_capping_is_refused_naming_the_architecture():
    config = transformers.Gemma2Config(**COMMON, head_dim=16, attn_logit_softcapping=50.0)
    model = transformers.Gemma2ForCausalLM(config).eval()
    with (
        pytest.raises(ValueError, match=r"Gemma2ForCausalLM.*soft-capping"),
        hf.use(model, Dense()),
    ):
        pass


def test_an_unsupported_architecture_is_refused_naming_it():
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB)
    model = transformers.GPT2LMHeadModel(config).eval()
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*'gpt2'.*not a supported"):
        with hf.use(model, Dense()):
            pass


@torch.no_grad()
def test_bad_inputs_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="window"), hf.use(model, "streaming_llm:window=abc"):
        pass
    with pytest.raises(TypeError, match="PreTrainedModel"), hf.use(torch.nn.Linear(2, 2), Dense()):
        pass
    with pytest.raises(ValueError, match="causal"), hf.use(model, Dense(causal=False)):
        pass
    with hf.use(model, Dense()) as cache:
        model(tokens(1, 4))  # transformers' own cache: the block's cache stays unused
    with pytest.raises(RuntimeError, match="ended"):
        model(tokens(1, 4), past_key_values=cache)
    with hf.use(model, Dense()), pytest.raises(ValueError, match="max_position_embeddings"):
        model(tokens(1, COMMON["max_position_embeddings"] + 1))
    model.train()
    with hf.use(model, Dense()), pytest.raises(ValueError, match="dropout|training"):
        model.config.attention_dropout = 0.1
        model.model.layers[0].self_attn.attention_dropout = 0.1
        model(tokens(1, 8))


@pytest.mark.model
@torch.no_grad()
def test_the_real_model_under_dense_reproduces_its_sdpa_logits_and_greedy_text(real_model):
    model, tok = real_model
    ids = tok("The capital of France is Paris. " * 60, return_tensors="pt").input_ids[:, :512]
    own = model(ids, logits_to_keep=64).logits
    prompt = tok("The capital of France is", return_tensors="pt").input_ids
    own_text = model.generate(prompt, max_new_tokens=4, do_sample=False)
    with hf.use(model, Dense()) as cache:
        ours = model(ids, logits_to_keep=64).logits
        ours_text = model.generate(prompt, max_new_tokens=4, do_sample=False, past_key_values=cache)
    assert (ours - own).abs().max().item() <= 1e-4
    assert torch.equal(ours_text, own_text)
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.model
@torch.no_grad()
def test_the_real_model_streams_with_a_bounded_cache(real_model):
    model, tok = real_model
    ids = tok("The capital of France is Paris. " * 60, return_tensors="pt").input_ids[:, :300]
    method = StreamingLLM(sinks=4, window=64)
    with hf.use(model, method) as cache:
        full = model(ids, logits_to_keep=1).logits[:, -1]
        model(ids[:, :-1], past_key_values=cache)
        last = model(ids[:, -1:], past_key_values=cache).logits[:, -1]
        held = [cache.kv.seq_len(layer) for layer in range(model.config.num_hidden_layers)]
        page = cache.kv.page_size
    # what the next query sees, plus fewer than a page of dropped keys not yet evicted
    assert max(held) < method.sinks + method.window - 1 + page
    assert (last - full).abs().max().item() <= 1e-4


@torch.no_grad()
def test_the_cache_goes_by_the_name_the_model_takes_and_comes_back():
    model = tiny_model("llama")
    named = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with hf.use(model, Dense()) as cache:
        kwargs = hf.with_cache(model, cache)
        assert list(kwargs) == [named] and kwargs[named] is cache
        out = model(tokens(1, 6), **kwargs, use_cache=True)
        assert hf.returned_cache(out) is cache
        assert cache.get_seq_length() == 6
