"""Attention transfer (``longattn.eval.distill``) on a tiny random Llama: the training form, the loss,
resuming, and the calibration file it writes."""

import dataclasses
import math
import types

import pytest
import torch

from longattn.calibration import Calibration
from longattn.eval import distill as D
from longattn.eval import tasks
from longattn.eval.lora import LoraSettings, lora_pass

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SETTINGS = D.DistillSettings(
    model="tiny-llama", length=48, windows=2, steps=12, rows=16, window=8, features=8, lr=0.02
)


class CharTokenizer:
    """Characters as token ids (enough for ``tasks.text_window``)."""

    bos_token_id = 1

    def __init__(self, vocab: int):
        self.vocab = vocab

    def __call__(self, text, add_special_tokens=False):
        return types.SimpleNamespace(input_ids=[2 + ord(c) % (self.vocab - 2) for c in text])


def tiny_llama(layers=2, kv_heads=2):
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval(), CharTokenizer(config.vocab_size)


def _qkv(gen, heads=4, kv_heads=2, length=40, dim=16, dtype=torch.float64):
    q = torch.randn(1, heads, length, dim, generator=gen, dtype=dtype)
    k = torch.randn(1, kv_heads, length, dim, generator=gen, dtype=dtype)
    v = torch.randn(1, kv_heads, length, dim, generator=gen, dtype=dtype)
    return q, k, v


def _definition(q, k, v, phi_q, phi_k, pos, scale, window):
    """Windowed linear attention row by row, straight from its definition (float64)."""
    group = q.shape[1] // k.shape[1]
    out = torch.empty(1, q.shape[1], len(pos), v.shape[-1], dtype=torch.float64)
    for h in range(q.shape[1]):
        for i, t in enumerate(pos.tolist()):
            s = torch.arange(t + 1)
            recent = t - s < window
            exact = torch.exp(scale * k[0, h // group, s] @ q[0, h, t]) * recent
            linear = (phi_k[0, h // group, s] @ phi_q[0, h, i]) * ~recent
            w = exact + linear
            out[0, h, i] = w @ v[0, h // group, s] / w.sum()
    return out


def test_windowed_linear_is_its_definition():
    """Both float64. Every output is a ratio of sums of <= T non-negative terms, each a product
    of a D- or F-term dot product: relative rounding <= (T + D + F + 4) u per sum, so the ratio is
    off by at most 2 (T + D + F + 4) u max|v| (plus the same for the exp of a rounded score,
    absorbed by the factor 2 below)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(gen)
    phi_q = torch.rand(1, 4, q.shape[2], 12, generator=gen, dtype=torch.float64)
    phi_k = torch.rand(1, 2, q.shape[2], 12, generator=gen, dtype=torch.float64)
    pos = torch.tensor([0, 3, 7, 8, 9, 20, 21, 39])
    scale, window = 0.25, 8
    exact = D.exact_window(q[:, :, pos], pos, k, v, scale, window)
    got = D.windowed_linear(phi_q[:, :, pos], pos, phi_k, D.with_ones(v), exact, window)
    want = _definition(q, k, v, phi_q[:, :, pos], phi_k, pos, scale, window)
    u = torch.finfo(torch.float64).eps / 2
    bound = 4 * (q.shape[2] + q.shape[3] + 12 + 4) * u * v.abs().max()
    assert (got - want).abs().max() <= bound
    dropped = D.windowed_linear(phi_q[:, :, pos], pos, phi_k, D.with_ones(v), exact, window - 1)
    assert (dropped - want).abs().max() > bound  # a key moved to the wrong part is seen


@pytest.mark.parametrize("sinks", [0, 3])
def test_training_form_is_the_engines_form(sinks):
    """The loss's windowed linear attention (float32) is within the engine contract's derived
    bound of its float64 reference (``testing_linear.linear_bound``): training and run time
    compute the same function."""
    from longattn.testing_linear import linear_bound

    gen = torch.Generator().manual_seed(2)
    q, k, v = _qkv(gen, length=70, dtype=torch.float32)
    phi_q = torch.rand(1, 4, 70, 12, generator=gen)
    phi_k = torch.rand(1, 2, 70, 12, generator=gen)
    pos = torch.arange(70)
    exact = D.exact_window(q, pos, k, v, 0.25, 16, sinks)
    got = D.windowed_linear(phi_q, pos, phi_k, D.with_ones(v), exact, 16, sinks)
    ref = linear_bound(phi_q, phi_k, v, window=16, q_raw=q, k_raw=k, scale=0.25, sinks=sinks)
    assert ((got.double() - ref.ref).abs() <= ref.out).all()
    moved = D.windowed_linear(phi_q, pos, phi_k, D.with_ones(v), exact, 17, sinks)
    assert not ((moved.double() - ref.ref).abs() <= ref.out).all()
    other = D.exact_window(q, pos, k, v, 0.25, 16, 3 - sinks)  # sinks added or dropped
    wrong = D.windowed_linear(phi_q, pos, phi_k, D.with_ones(v), other, 16, 3 - sinks)
    assert not ((wrong.double() - ref.ref).abs() <= ref.out).all()


def test_window_covering_everything_is_softmax():
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(gen)
    pos = torch.arange(q.shape[2])
    exact = D.exact_window(q, pos, k, v, 0.25, q.shape[2])
    phi = torch.ones(1, 4, q.shape[2], 3, dtype=torch.float64)
    got = D.windowed_linear(phi, pos, phi[:, :2], D.with_ones(v), exact, q.shape[2])
    want = D.softmax_attention(q, k, v, 0.25)
    u = torch.finfo(torch.float64).eps / 2
    assert (got - want).abs().max() <= 4 * (q.shape[2] + q.shape[3] + 4) * u * v.abs().max()


def test_settings_refuse_bad_values():
    for bad in (
        {"steps": 0},
        {"features": -1},
        {"lr": 0.0},
        {"length": 64, "window": 64},
        {"sinks": -1},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            dataclasses.replace(SETTINGS, **bad)


def test_windows_are_disjoint():
    _, tokenizer = tiny_llama()
    train = D.disjoint_windows(tokenizer, "pydoc", 64, 3)
    held = D.disjoint_windows(tokenizer, "pydoc", 96, 2, train, seed=D.HELDOUT_SEED)
    grams = [tasks.ngrams(ids) for ids in train + held]
    assert all(len(ids) == 64 for ids in train) and all(len(ids) == 96 for ids in held)
    assert all(not (a & b) for i, a in enumerate(grams) for b in grams[i + 1 :])


def test_training_lowers_the_held_out_error(tmp_path):
    model, tokenizer = tiny_llama()
    losses = []
    cal = D.distill(model, tokenizer, SETTINGS, tmp_path / "h.safetensors",
                    on_step=lambda step, info: losses.append(info["mse"]))  # fmt: skip
    assert len(losses) == 2 * SETTINGS.steps and all(math.isfinite(x) for x in losses)
    mse = cal.params["mse"]
    for layer in range(2):
        assert mse["trained"][layer] < mse["init"][layer]
    assert not (tmp_path / "h.safetensors.checkpoint").exists()


def test_resume_continues_at_the_next_layer(tmp_path):
    model, tokenizer = tiny_llama()
    whole = D.distill(model, tokenizer, SETTINGS, tmp_path / "whole.safetensors")
    out = tmp_path / "parts.safetensors"
    steps = []
    first = D.distill(model, tokenizer, SETTINGS, out, max_layers=1,
                      on_step=lambda step, info: steps.append((step, info["layer"])))  # fmt: skip
    assert first is None and out.with_name(out.name + ".checkpoint").is_file()
    assert not out.exists()
    rest = D.distill(model, tokenizer, SETTINGS, out,
                     on_step=lambda step, info: steps.append((step, info["layer"])))  # fmt: skip
    assert [layer for _, layer in steps] == [0] * SETTINGS.steps + [1] * SETTINGS.steps
    assert steps[SETTINGS.steps][0] == SETTINGS.steps + 1  # the bar continues where it stopped
    for name in ("q_proj", "k_proj"):
        assert torch.equal(rest.tensors[name], whole.tensors[name])  # seeds are per layer


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    model, tokenizer = tiny_llama()
    out = tmp_path / "h.safetensors"
    D.distill(model, tokenizer, SETTINGS, out, max_layers=1)
    with pytest.raises(ValueError, match="remove it or write elsewhere"):
        D.distill(model, tokenizer, dataclasses.replace(SETTINGS, lr=0.05), out)


def test_calibration_round_trips_and_is_refused_for_another_shape(tmp_path):
    model, tokenizer = tiny_llama()
    out = tmp_path / "h.safetensors"
    cal = D.distill(model, tokenizer, SETTINGS, out)
    loaded = Calibration.load(out)
    assert loaded.method == "hedgehog" and loaded.model == "tiny-llama"
    assert loaded.params == json_roundtrip(cal.params)
    assert tuple(loaded.tensors["q_proj"].shape) == (2, 2, 2, 16, SETTINGS.features)
    assert tuple(loaded.tensors["k_proj"].shape) == (2, 2, 16, SETTINGS.features)
    for name in ("q_proj", "k_proj"):
        assert torch.equal(loaded.tensors[name], cal.tensors[name])
    D.check_calibration(loaded, model.config)
    for other in (tiny_llama(layers=3)[0], tiny_llama(kv_heads=4)[0]):
        with pytest.raises(ValueError, match="tiny-llama"):
            D.check_calibration(loaded, other.config)
    wrong = Calibration("hedgehog", "tiny-llama", 2, 2, 16, {"q_proj": loaded.tensors["k_proj"]})
    with pytest.raises(ValueError, match="q_proj"):
        D.check_calibration(wrong, model.config)


def test_converted_layer_runs_what_was_trained(tmp_path):
    """``attention(..., method=Hedgehog(calibration=file, window=W))`` on a layer's captured q/k/v
    and the training form both hold the engine contract's bound around the float64 reference
    built from the same maps."""
    from longattn import attention
    from longattn.methods import hedgehog
    from longattn.testing_linear import linear_bound

    model, tokenizer = tiny_llama()
    out = tmp_path / "h.safetensors"
    cal = D.distill(model, tokenizer, SETTINGS, out)
    layer, scale, window, sinks = 1, D.attention_scales(model)[1], SETTINGS.window, SETTINGS.sinks
    ids = D.disjoint_windows(tokenizer, "pydoc", 40, 1, seed=77)
    q, k, v = D.capture_layers(model, ids, [layer], {layer: scale})[layer][0][:3]
    wq = cal.tensors["q_proj"][layer].flatten(0, 1)  # [H, D, F]
    wk = cal.tensors["k_proj"][layer]
    features = [D.hedgehog_features(x.double(), wq.double(), wk.double(), role, layer, scale)
                for x, role in ((q, "query"), (k, "key"))]  # fmt: skip
    ref = linear_bound(features[0].float(), features[1].float(), v, window=window, q_raw=q,
                       k_raw=k, scale=scale, sinks=sinks)  # fmt: skip
    method = hedgehog.Hedgehog(calibration=str(out), window=window, sinks=sinks)
    ran = attention(q, k, v, method=method, layer=layer, scale=scale).out
    pos = torch.arange(q.shape[2])
    part = D.Window.prepare(q, k, v, v, scale, window, sinks)
    trained = D.student(part, pos, wq, wk, layer, scale, (window, sinks))
    assert ((ran.double() - ref.ref).abs() <= ref.out).all()
    assert ((trained.double() - ref.ref).abs() <= ref.out).all()


def test_lora_pass_trains_and_saves_an_adapter(tmp_path):
    pytest.importorskip("peft")
    from longattn.methods.hedgehog import Hedgehog

    model, tokenizer = tiny_llama()
    out = tmp_path / "h.safetensors"
    D.distill(model, tokenizer, SETTINGS, out)
    windows = D.disjoint_windows(tokenizer, "pydoc", 48, 2)
    method = Hedgehog(calibration=str(out), window=SETTINGS.window)
    settings = LoraSettings(steps=4, lr=1e-2)
    losses = lora_pass(model, method, windows, settings, tmp_path / "h.lora")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[2] < losses[0]  # the same window again, after two steps
    assert (tmp_path / "h.lora" / "adapter_model.safetensors").is_file()


def json_roundtrip(value):
    import json

    return json.loads(json.dumps(value))


def test_cli_parses_distill():
    from longattn.cli import build_parser

    args = build_parser().parse_args(["distill", "--out", "x.safetensors", "--steps", "5"])
    assert (
        args.steps == 5
        and args.window == D.DistillSettings().window
        and args.sinks == 4
        and args.threads == 2
    )
    assert args.func is D.run_command
