"""DuoAttention and RazorAttention: the gated attention, the gate training, the calibrations and
the score hooks (tiny random-init models, no download)."""

import pytest
import torch

from longattn import calibration, from_string
from longattn.calibration import Calibration, interleave_ranks, rank_heads, razor_head_scores
from longattn.methods import DuoAttention, RazorAttention, StreamingLLM
from longattn.testing import make_qkv, oracle, write_head_calibration
from longattn.types import ScoreView

N_LAYERS, N_KV, DIM = 3, 2, 16


def score_view(layer: int, cal: dict | None, n_layers: int = N_LAYERS, n_kv: int = N_KV):
    keys = torch.randn(2, n_kv, 10, DIM)
    positions = torch.arange(10).expand(2, n_kv, 10)
    return ScoreView(
        keys, keys, positions, torch.zeros(2, 2 * n_kv, 0, DIM), torch.zeros(2, 0, dtype=torch.long),
        DIM**-0.5, layer, n_layers, 10, weights=lambda q, p: None, calibration=cal,
    )  # fmt: skip


# ---------------------------------------------------------------- the score hooks


@pytest.mark.parametrize("cls, method", [(DuoAttention, "duo_attention"),
                                         (RazorAttention, "razor_attention")])  # fmt: skip
def test_scores_follow_the_calibrated_ranks_over_the_whole_model(tmp_path, cls, method):
    path = write_head_calibration(method, N_LAYERS, N_KV, DIM, tmp_path / "c.safetensors")
    cal = calibration.load(path)
    cal.check(method, N_LAYERS, N_KV, DIM)
    rank = cal.tensors["rank"]
    for retrieval, keep in [(0.5, 3), (0.34, 2), (0.0, 0), (1.0, 6)]:
        m = cls(calibration=str(path), retrieval=retrieval)
        for layer in range(N_LAYERS):
            scores = m.score(score_view(layer, cal.layer(layer)))
            assert scores.shape == (2, N_KV, 10) and scores.dtype == torch.float32
            want = rank[layer] < keep  # the `keep` best heads of all 6
            assert torch.equal(scores[:, want], torch.full_like(scores[:, want], torch.inf))
            assert torch.equal(scores[:, ~want], torch.full_like(scores[:, ~want], -torch.inf))


def test_a_pattern_stands_in_for_a_calibration():
    scores = from_string("duo_attention:pattern=0/1").score(score_view(1, None, n_kv=4))
    assert scores[0, :, 0].tolist() == [-torch.inf, torch.inf, -torch.inf, torch.inf]
    scores = from_string("razor_attention:pattern=1").score(score_view(0, None))
    assert bool((scores == torch.inf).all())


@pytest.mark.parametrize("cls", [DuoAttention, RazorAttention])
def test_scoring_without_a_calibration_is_refused(cls):
    with pytest.raises(ValueError, match="needs a calibration file"):
        cls().score(score_view(0, None))


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"retrieval": 1.5}, "retrieval must be in"),
        ({"retrieval": -0.1}, "retrieval must be in"),
        ({"pattern": (0, 2)}, "pattern must be"),
        ({"pattern": ()}, "pattern must be"),
        ({"pattern": (1,), "calibration": "x.safetensors"}, "not both"),
        ({"sinks": -1}, "sinks"),
        ({"tokens": 100}, "must exceed sinks"),
    ],
)
@pytest.mark.parametrize("cls", [DuoAttention, RazorAttention])
def test_bad_fields_are_refused(cls, kwargs, words):
    with pytest.raises(ValueError, match=words):
        cls(**kwargs)


def test_calibrations_for_another_method_or_shape_are_refused(tmp_path):
    duo = calibration.load(
        write_head_calibration("duo_attention", N_LAYERS, N_KV, DIM, tmp_path / "d.safetensors")
    )
    with pytest.raises(ValueError, match="for method 'duo_attention', not 'razor_attention'"):
        duo.check("razor_attention", N_LAYERS, N_KV, DIM)
    with pytest.raises(ValueError, match="has shape"):
        duo.check("duo_attention", N_LAYERS + 1, N_KV, DIM)
    with pytest.raises(ValueError, match="has shape"):
        duo.check("duo_attention", N_LAYERS, N_KV, DIM * 2)
    no_rank = Calibration("duo_attention", "m", N_LAYERS, N_KV, DIM, {"gates": torch.rand(3, 2)})
    with pytest.raises(ValueError, match="needs a tensor 'rank'"):
        no_rank.check("duo_attention", N_LAYERS, N_KV, DIM)
    twice = torch.zeros(N_LAYERS, N_KV, dtype=torch.long)
    bad = Calibration(
        "duo_attention", "m", N_LAYERS, N_KV, DIM, {"gates": twice.float(), "rank": twice}
    )
    with pytest.raises(ValueError, match="must order the 6 heads"):
        bad.check("duo_attention", N_LAYERS, N_KV, DIM)
    # a layer's ranks that cannot belong to this model (a file of another shape, checked late)
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, 6\)"):
        DuoAttention(calibration="x").score(score_view(0, {"rank": torch.tensor([0, 7])}))


def test_ranks_and_their_interleaving():
    scores = torch.tensor([[0.1, 0.9], [0.5, 0.5]])
    assert rank_heads(scores).tolist() == [[3, 0], [1, 2]]  # ties: the earlier head first
    echo = torch.tensor([[9.0, 0.0, 0.0], [0.0, 8.0, 0.0]])
    induction = torch.tensor([[1.0, 6.0, 5.0], [4.0, 3.0, 2.0]])
    # share 1/3: an echo head opens each group of three (rounded up), each head once
    order = interleave_ranks(echo, induction, 1 / 3).flatten().argsort().tolist()
    assert order == [0, 1, 2, 4, 3, 5]


# ---------------------------------------------------------------- RazorAttention's head scores


def test_echo_and_induction_heads_are_told_apart():
    """KV head 0's group holds an echo head (it looks for the same token), KV head 1's an induction
    head (the token after it); each group's other query head is unfocused: the group's maximum."""
    period, repeats, dim = 12, 3, 32
    gen = torch.Generator().manual_seed(0)
    embed = torch.nn.functional.normalize(torch.randn(period, dim, generator=gen), dim=-1)
    tokens = torch.arange(period).repeat(repeats)  # [T]
    k = embed[tokens][None, None].expand(1, 2, -1, -1)  # [1, 2, T, D]
    q_echo = 30 * embed[tokens]
    q_induction = 30 * embed[(tokens + 1) % period]
    flat = torch.zeros_like(q_echo)
    # [1, 4, T, D]: groups (0, 1), (2, 3); laid out [B, T, H, D] as a model's projections are
    q = torch.stack([flat, q_echo, q_induction, flat], dim=1)[None].transpose(1, 2)
    echo, induction = razor_head_scores(q, k, period)
    assert echo[0] > 0.3 > echo[1] and induction[1] > 0.3 > induction[0]


# ---------------------------------------------------------------- the gated attention

transformers = pytest.importorskip("transformers")
from longattn.integrations.hf_gates import (  # noqa: E402
    GateTraining,
    gated,
    mixed_attention,
    train_gates,
)

SINKS, RECENT = 2, 6


def test_the_mix_is_alpha_full_plus_one_minus_alpha_streaming_in_float64():
    q, k, v = make_qkv(2, 4, 2, 20, 20, 16, dtype=torch.float64, seed=3)
    gates = torch.tensor([0.25, 0.8], dtype=torch.float64)
    out = mixed_attention(q, k, v, gates, SINKS, RECENT)
    full = oracle(q, k, v).out
    stream = oracle(q, k, v, StreamingLLM(sinks=SINKS, window=RECENT)).out
    alpha = gates.repeat_interleave(2)[None, :, None, None]
    torch.testing.assert_close(out, alpha * full + (1 - alpha) * stream, rtol=1e-12, atol=1e-12)
    # fewer queries than keys: the queries are the last positions
    out = mixed_attention(q[:, :, -5:], k, v, gates, SINKS, RECENT)
    want = alpha * full[:, :, -5:] + (1 - alpha) * stream[:, :, -5:]
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def tiny_llama(seed: int = 0, dtype=torch.float64):
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=128,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def ids(length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 64, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_gates_one_and_zero_give_the_full_and_the_streaming_model():
    from longattn import hf

    model, x = tiny_llama(), ids()
    own = model(x).logits
    with gated(model, torch.ones(2, 2, dtype=torch.float64), SINKS, RECENT):
        ones = model(x).logits
    torch.testing.assert_close(ones, own, rtol=1e-10, atol=1e-10)
    with hf.use(model, StreamingLLM(sinks=SINKS, window=RECENT)):
        streaming = model(x).logits
    with gated(model, torch.zeros(2, 2, dtype=torch.float64), SINKS, RECENT):
        zeros = model(x).logits
    torch.testing.assert_close(zeros, streaming, rtol=1e-10, atol=1e-10)
    assert (zeros - own).abs().max() > 1e-3  # the window really acts at this length
    assert model.config._attn_implementation == "sdpa"  # restored


def test_every_gate_gets_a_gradient():
    model, x = tiny_llama(), ids()
    for p in model.parameters():
        p.requires_grad_(False)
    gates = torch.nn.Parameter(torch.full((2, 2), 0.5, dtype=torch.float64))
    with gated(model, gates, SINKS, RECENT):
        model(x).logits[0, -4:].pow(2).sum().backward()
    assert gates.grad is not None and bool((gates.grad.abs() > 0).all())


def test_gates_must_fit_the_model():
    with pytest.raises(ValueError, match=r"gates must be \[n_layers, n_kv_heads\] = \(2, 2\)"):
        with gated(tiny_llama(), torch.ones(3, 2), SINKS, RECENT):
            pass


def batch(step: int):
    x = ids(24, seed=10 + step)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[:, -6:] = True
    return x, mask


def test_a_short_calibration_writes_a_loadable_file_and_resumes(tmp_path):
    model = tiny_llama(dtype=torch.float32)
    settings = GateTraining(steps=3, sinks=SINKS, recent=RECENT, lr=0.1, save_every=1)
    seen = []
    straight = train_gates(
        model, batch, settings, tmp_path / "a.ckpt", on_step=lambda s, _: seen.append(s)
    )
    assert seen == [1, 2, 3] and straight.shape == (2, 2)
    assert bool(((straight >= 0) & (straight <= 1)).all()) and bool((straight < 1).any())
    assert all(p.requires_grad for p in model.parameters())  # unfrozen afterwards
    assert model.config._attn_implementation == "sdpa"  # and its own attention back
    # two steps, then a rerun with three continues from the checkpoint: the same gates
    two = GateTraining(steps=2, sinks=SINKS, recent=RECENT, lr=0.1, save_every=1)
    train_gates(model, batch, two, tmp_path / "b.ckpt")
    seen.clear()
    resumed = train_gates(
        model, batch, settings, tmp_path / "b.ckpt", on_step=lambda s, _: seen.append(s)
    )
    assert seen == [3]
    torch.testing.assert_close(resumed, straight, rtol=1e-6, atol=1e-6)
    cal = Calibration(
        "duo_attention", "tiny", 2, 2, 8, {"gates": resumed, "rank": rank_heads(resumed)}
    )
    loaded = calibration.load(cal.save(tmp_path / "duo.safetensors"))
    loaded.check("duo_attention", 2, 2, 8)
    torch.testing.assert_close(loaded.tensors["gates"], resumed)
    with pytest.raises(ValueError, match="was made with"):  # other settings: not continued
        train_gates(model, batch, GateTraining(steps=4, sinks=SINKS, recent=RECENT + 1),
                    tmp_path / "b.ckpt")  # fmt: skip


@pytest.mark.parametrize("method", ["duo_attention", "razor_attention", "qfilters"])
def test_the_shipped_smollm2_calibrations_fit_the_model(method):
    from longattn.eval.calibrate import SHIPPED

    cal = calibration.load(SHIPPED[method])
    cal.check(method, 30, 3, 64)  # SmolLM2-135M: 30 layers, 3 KV heads, head dim 64
    assert cal.model == "smollm2-135m"


def test_passkey_data_is_exact_deterministic_and_masks_the_answers():
    from test_eval import WordTokenizer  # the word-level tokenizer of the eval tests

    from longattn.eval.calibrate import PasskeyData

    data = PasskeyData(WordTokenizer(vocab=64), length=240, n_keys=2, n_words=3, seed=5)
    lengths = []
    for step in range(4):
        x, mask = data(step)
        lengths.append(x.shape[1])
        assert x.shape == mask.shape and mask.dtype == torch.bool
        tail = int(mask.sum())
        assert tail > 0 and bool(mask[0, -tail:].all()) and not bool(mask[0, :-tail].any())
    assert lengths == [120, 160, 200, 240]  # evenly spaced in [length / 2, length]
    assert torch.equal(data(1)[0], data(1)[0]) and not torch.equal(data(0)[0], data(4)[0][:, :120])
    with pytest.raises(ValueError, match="too short"):
        PasskeyData(WordTokenizer(vocab=64), length=80, n_keys=4)(1)


def test_calibrate_commands_refuse_bad_input_before_loading_a_model(tmp_path, capsys):
    from longattn.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["calibrate", "duo", "--out", str(tmp_path / "d"), "--steps", "0"])
    assert exit_info.value.code == 2
    code = main(["calibrate", "razor", "--model", "no-such-model", "--out", str(tmp_path / "r")])
    assert code == 2 and "no-such-model" in capsys.readouterr().err
    code = main(["calibrate", "qfilters", "--model", "no-such-model", "--out", str(tmp_path / "q")])
    assert code == 2 and "no-such-model" in capsys.readouterr().err


def test_the_shipped_qfilters_directions_are_unit_vectors_that_score_keys():
    """The shipped Q-Filters file: one unit direction per (layer, KV head), usable as is."""
    from longattn import KVCache, attention
    from longattn.eval.calibrate import SHIPPED
    from longattn.methods.qfilters import QFilters

    filters = calibration.load(SHIPPED["qfilters"]).tensors["filter"]
    assert filters.shape == (30, 3, 64)
    torch.testing.assert_close(filters.norm(dim=-1), torch.ones(30, 3))
    method = QFilters(budget=0.25, calibration=str(SHIPPED["qfilters"]))
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 9, 200, 64, generator=gen), torch.randn(1, 3, 201, 64, generator=gen)
    cache = KVCache(30)
    attention(q, k[:, :, :200], k[:, :, :200], method=method, cache=cache, layer=29)
    attention(q[:, :, -1:], k[:, :, 200:], k[:, :, 200:], method=method, cache=cache, layer=29)
    assert int(cache.head_lengths(29).max()) < 100  # compressed to its budget at the first step
