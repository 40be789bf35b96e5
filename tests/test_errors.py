"""Bad input gets a clear ValueError / TypeError that names the offending value."""

import json

import pytest
import torch

from longattn import attention, from_string, get, methods, register
from longattn.kernels.reference import MAX_BYTES_ENV
from longattn.method import Method
from longattn.testing import make_qkv


def qkv(**kw):
    return make_qkv(**{"batch": 1, "n_heads": 4, "q_len": 8, "head_dim": 16, **kw})


@pytest.mark.parametrize(
    "mutate, exc, words",
    [
        (lambda q, k, v: (q[0], k, v), ValueError, "4-D"),
        (lambda q, k, v: (q, k[:, :, :, :8], v[:, :, :, :8]), ValueError, "head_dim"),
        (lambda q, k, v: (q, torch.cat([k, k]), torch.cat([v, v])), ValueError, "batch"),
        (lambda q, k, v: (q, k[:, :3], v[:, :3]), ValueError, "multiple"),
        (lambda q, k, v: (q, k.double(), v), TypeError, "dtypes differ"),
        (lambda q, k, v: (q.half(), k.half(), v.half()), TypeError, "float16"),
        (lambda q, k, v: (q.long(), k.long(), v.long()), TypeError, "floating point"),
        (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, "k and v shapes"),
        (lambda q, k, v: (torch.cat([q, q], 2), k, v), ValueError, "16 > 8"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "torch.Tensor"),
    ],
)
def test_bad_tensors(mutate, exc, words):
    with pytest.raises(exc, match=words):
        attention(*mutate(*qkv()))


@pytest.mark.parametrize(
    "kwargs, exc, words",
    [
        ({"q_positions": torch.arange(8.0), "kv_positions": torch.arange(8)}, TypeError, "integer"),
        ({"q_positions": torch.arange(7), "kv_positions": torch.arange(8)}, ValueError, r"\[8\]"),
        ({"kv_positions": torch.tensor([0, 1, 2, 2, 3, 4, 5, 6])}, ValueError, "increasing"),
        ({"q_positions": torch.arange(-2, 6)}, ValueError, "-2"),
        ({"scale": "big"}, TypeError, "big"),
        ({"scale": float("nan")}, TypeError, "nan"),
        ({"impl": "fastest"}, ValueError, "fastest"),
        ({"method": 3}, TypeError, "int"),
        ({"method": "nope"}, ValueError, "nope"),
    ],
)
def test_bad_arguments(kwargs, exc, words):
    with pytest.raises(exc, match=words):
        attention(*qkv(), **kwargs)


def test_explicit_impl_that_cannot_run_names_the_reason():
    with pytest.raises(ValueError, match="impl='sdpa' cannot run.*sliding_window"):
        attention(*qkv(), method=methods.SlidingWindow(window=4), impl="sdpa")


def test_reference_refuses_beyond_its_memory_cap(monkeypatch):
    monkeypatch.setenv(MAX_BYTES_ENV, str(1 << 10))
    with pytest.raises(ValueError, match="impl='tiled'"):
        attention(*qkv(q_len=64), impl="reference")
    # auto skips the reference and still answers
    assert attention(*qkv(q_len=64), method=methods.SlidingWindow(window=4)).out.shape[2] == 64
    monkeypatch.setenv(MAX_BYTES_ENV, "lots")
    with pytest.raises(ValueError, match="lots"):
        attention(*qkv(), impl="reference")


@pytest.mark.parametrize(
    "build, exc, words",
    [
        (lambda: methods.SlidingWindow(window=0), ValueError, "window must be > 0, got 0"),
        (lambda: methods.SlidingWindow(window=-3), ValueError, "-3"),
        (lambda: methods.SlidingWindow(window=2.5), TypeError, "2.5"),
        (lambda: methods.SlidingWindow(dilation=0), ValueError, "dilation"),
        (lambda: methods.StreamingLLM(sinks=-1), ValueError, "sinks must be >= 0, got -1"),
        (lambda: methods.StreamingLLM(window=0), ValueError, "window"),
        (lambda: methods.Strided(mode="diagonal"), ValueError, "diagonal"),
        (lambda: methods.Strided(stride=4, summary=5), ValueError, "summary"),
        (lambda: methods.PowerAttention(block_size=0), ValueError, "block_size"),
        (lambda: methods.Neighborhood2D(height=4, kernel=5), ValueError, "height=4"),
        (lambda: methods.PerHeadWindow(windows=()), ValueError, "windows"),
        (lambda: methods.PerHeadWindow(windows=(4, 0)), ValueError, r"windows\[1\]"),
        (lambda: from_string("sliding_window:window=abc"), ValueError, "abc"),
        (lambda: from_string("sliding_window:size=4"), ValueError, "size"),
        (lambda: from_string("sliding_window:window"), ValueError, "field=value"),
        (lambda: get("flash9"), ValueError, "flash9"),
    ],
)
def test_bad_method_parameters(build, exc, words):
    with pytest.raises(exc, match=words):
        build()


def test_positions_outside_a_grid_method():
    q, k, v = qkv(q_len=20)
    with pytest.raises(ValueError, match="positions must be < 16"):
        attention(q, k, v, method=methods.Neighborhood2D(height=4, width=4, kernel=3))


def test_register_rejects_duplicates_and_non_methods():
    with pytest.raises(ValueError, match="already registered"):
        register("dense")(type("Other", (Method,), {}))
    with pytest.raises(TypeError, match="Method subclass"):
        register("not_a_method_xyz")(int)


def test_from_string_round_trips_every_default():
    from longattn import registry

    for cls in registry().values():
        method = cls()
        assert from_string(method.describe()) == method


# ---------------------------------------------------------------- sparse_attention (public kernel)


def _sparse_args(q_len=8, partial=False):
    from longattn.types import BlockIndex

    q, k, v = qkv(q_len=q_len, n_heads=2)
    ones = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    index = BlockIndex.from_block_mask(
        ones, 8, partial=ones if partial else None, q_len=q_len, kv_len=q_len
    )
    return q, k, v, index


@pytest.mark.parametrize(
    "change, exc, words",
    [
        (lambda a: {**a, "q": a["q"][0]}, ValueError, r"q must be \[B, H, T, D\]"),
        (lambda a: {**a, "k": a["k"][:, :1].repeat(1, 3, 1, 1), "v": a["v"][:, :1].repeat(1, 3, 1, 1)},
         ValueError, r"query heads \(2\) must be a multiple of key/value heads \(3\)"),
        (lambda a: {**a, "index": None}, TypeError, "index must be a BlockIndex, got NoneType"),
        (lambda a: {**a, "scale": "big"}, TypeError, "big"),
        (lambda a: {**a, "mask_fn": 3}, TypeError, "mask_fn must be callable"),
        (lambda a: {**a, "q_pos": torch.arange(5).view(1, -1)}, ValueError, r"q_pos.*\(1, 5\)"),
        (lambda a: {**a, "kv_pos": torch.arange(8.0).view(1, -1)}, TypeError, "kv_pos.*float"),
        (lambda a: {**a, "q": a["q"][..., :0], "k": a["k"][..., :0], "v": a["v"][..., :0]},
         ValueError, "head_dim > 0"),
    ],
)  # fmt: skip
def test_sparse_attention_names_bad_arguments(change, exc, words):
    from longattn.kernels.sparse import sparse_attention

    q, k, v, index = _sparse_args()
    args = change({"q": q, "k": k, "v": v, "index": index, "scale": 0.25})
    with pytest.raises(exc, match=words):
        sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("index"), **args)


def test_sparse_attention_without_mask_fn_treats_partial_blocks_as_visible():
    from longattn.kernels.sparse import sparse_attention
    from longattn.testing import assert_attention_close

    q, k, v, index = _sparse_args(partial=True)
    out = sparse_attention(q, k, v, index, scale=0.25, mask_fn=None)
    assert_attention_close(out, q, k, v, methods.Dense(causal=False), scale=0.25)


# ---------------------------------------------------------------- calibration files


def _calibration(tmp_path, **tensors):
    from longattn.calibration import Calibration

    tensors = tensors or {"basis": torch.randn(2, 2, 16, 16)}
    return Calibration("loki", "m", 2, 2, 16, tensors, {"rank": 4}).save(tmp_path / "c.safetensors")


def _written(path, data):
    path.write_bytes(data)
    return path


def _write_header(tmp_path, header):
    from safetensors.torch import save_file

    path = tmp_path / "h.safetensors"
    save_file({"basis": torch.randn(2, 2, 16, 16)}, str(path), metadata={"longattn": header})
    return path


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda p: _written(p, _calibration(p.parent).read_bytes()[:100]), "safetensors"),
        (lambda p: _written(p, _calibration(p.parent).read_bytes()[:-10]), "safetensors"),
        (lambda p: _written(p, b""), "safetensors"),
        (lambda p: _written(p, b"not a safetensors file at all"), "safetensors"),
        (lambda p: _write_header(p.parent, "{not json"), "not valid JSON"),
        (lambda p: _write_header(p.parent, "[1, 2]"), "header must hold"),
        (lambda p: _write_header(p.parent, '{"method": "loki"}'), "header must hold"),
        (lambda p: _write_header(p.parent, json.dumps({**HEADER, "n_layers": "two"})), "two"),
    ],
)
def test_bad_calibration_files_name_the_file(tmp_path, make, words):
    from longattn import calibration

    path = make(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=words) as info:
        calibration.load(path)
    assert str(path.name) in str(info.value)


HEADER = {
    "method": "loki", "model": "m", "n_layers": 2, "n_kv_heads": 2, "head_dim": 16,
    "params": {}, "version": 1,
}  # fmt: skip


def test_calibration_tensors_must_be_what_the_method_reads(tmp_path):
    from longattn import calibration

    wrong_name = calibration.load(_calibration(tmp_path, other=torch.randn(2, 2, 16, 16)))
    with pytest.raises(ValueError, match="needs a tensor 'basis'"):
        wrong_name.check("loki", 2, 2, 16)
    wrong_dim = calibration.load(_calibration(tmp_path, basis=torch.randn(2, 2, 8, 8)))
    with pytest.raises(ValueError, match=r"basis.*\(2, 2, 8, 8\)"):
        wrong_dim.check("loki", 2, 2, 16)


def test_calibration_path_must_be_a_path():
    from longattn import calibration

    with pytest.raises(TypeError, match="123"):
        calibration.load(123)


@pytest.mark.parametrize("cls", [methods.Loki, methods.DoubleSparsity])
def test_calibration_field_must_be_a_string(cls):
    with pytest.raises(TypeError, match="calibration must be str, got 123"):
        cls(calibration=123)


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "--length", "0"], "--length: expected an int > 0, got '0'"),
        (["bench", "--length", "ten"], "'ten'"),
        (["bench", "--heads", "0"], "--heads: expected an int > 0"),
        (["bench", "--dim", "-1"], "--dim: expected an int > 0"),
        (["bench", "--memory-length", "0"], "--memory-length"),
        (["bench", "kernels", "--dtypes", "float16"], "float16"),
        (["bench", "kernels", "--length", "100"], "multiple of 128, got 100"),
        (["eval", "--out", "{tmp}", "--new-tokens", "0"], "--new-tokens"),
        (["eval", "--out", "{tmp}", "--ppl-samples", "-2"], "--ppl-samples"),
        (["analyze", "--out", "{tmp}", "--window", "0"], "--window"),
    ],
)
def test_cli_usage_errors_exit_2_with_the_value(argv, words, capsys, tmp_path):
    from longattn.cli import main

    try:
        code = main([a.format(tmp=tmp_path / "out") for a in argv])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert words in capsys.readouterr().err


def test_docs_into_a_missing_folder_is_a_usage_error(tmp_path, capsys):
    from longattn.cli import main

    target = tmp_path / "missing" / "dir" / "x.md"
    assert main(["docs", "--out", str(target)]) == 2
    assert f"cannot write '{target}'" in capsys.readouterr().err


def test_analyze_checks_the_corpus_before_loading_the_model(tmp_path, monkeypatch):
    from longattn.eval import analyze, models

    def no_model(name):
        raise AssertionError("the model was loaded before the corpus was checked")

    monkeypatch.setattr(models, "load", no_model)
    with pytest.raises(ValueError, match="unknown corpus 'nosuch'"):
        analyze.run_analysis("smollm2-135m", 64, tmp_path / "a", corpus="nosuch")
