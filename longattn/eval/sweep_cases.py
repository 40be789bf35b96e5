"""The cases of the unusual-input sweep (``longattn.eval.sweep`` runs and classifies them):
``attention`` with every impl, odd shapes, strided layouts, dtypes, NaN / Inf, positions and scales;
``KVCache`` calls and decode steps; method construction and strings; ``sparse_attention``;
calibration files; the command line.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile

import torch

from longattn.api import attention
from longattn.eval.sweep import (
    Case,
    attention_check,
    cache_api_cases,
    call_attention,
    compare,
    run_cli,
)

IMPLS = ("auto", "decode_cpp", "decode", "sdpa", "sparse_cpp", "sparse", "tiled", "reference")
SWEEP_METHODS = (None, "dense:causal=false", "sliding_window:window=3",
                 "streaming_llm:sinks=1,window=3", "per_head_window:windows=2/3/5/8,sinks=1",
                 "quest:budget=4,page_size=4,dense_layers=0")  # fmt: skip


def _qkv(b=1, h=4, hkv=2, tq=8, tk=None, d=16, dtype=torch.float32, seed=0):
    from longattn.testing import make_qkv

    return make_qkv(b, h, hkv, tq, tk, d, dtype=dtype, seed=seed)


def _attn(area, desc, make, names=(), expect=None, oracle_kwargs=None, **kwargs) -> Case:
    """A call of ``attention(*make(), **kwargs)``, checked against the oracle when it returns."""

    def setup():
        q, k, v = make()
        ctx = {"q": q, "k": k, "v": v, "kwargs": kwargs}
        if expect is not None:
            ctx["expect"] = expect(q, k, v)
        if oracle_kwargs is not None:
            ctx["oracle_kwargs"] = oracle_kwargs
        return ctx

    shown = ", ".join(f"{key}={_show(val)}" for key, val in kwargs.items())
    name = f"{desc} | attention(q, k, v{', ' if shown else ''}{shown})"
    return Case(area, name, setup, call_attention, attention_check, tuple(names), name)


def _show(value) -> str:
    """A one-line repr: small tensors as the ``torch.tensor`` call that makes them."""
    if not isinstance(value, torch.Tensor):
        return repr(value).split(" at 0x")[0] + (">" if " at 0x" in repr(value) else "")
    dtype = "" if value.dtype == torch.int64 else f", dtype={value.dtype}"
    return f"torch.tensor({value.tolist()}{dtype})"


def _impl_cases() -> list[Case]:
    cases = []
    for method in SWEEP_METHODS:
        for impl in IMPLS:
            for tq, tk in ((1, 9), (8, 8)):
                make = lambda tq=tq, tk=tk: _qkv(tq=tq, tk=tk)  # noqa: E731
                cases.append(_attn("impl", f"q_len={tq} kv_len={tk}", make, ("impl",),
                                   method=method, impl=impl))  # fmt: skip
    for impl in ("fastest", "", "SDPA", None, 3, "flex "):
        cases.append(_attn("impl", "bad impl", _qkv, ("impl",), impl=impl))
    return cases


SHAPES = {  # name -> make_qkv arguments
    "T=0": dict(tq=0, tk=0), "Tq=0 Tk=5": dict(tq=0, tk=5), "T=1": dict(tq=1, tk=1),
    "D=1": dict(d=1), "D=0": dict(d=0), "D=3": dict(d=3), "D=257": dict(d=257),
    "H=3 Hkv=2": dict(h=3, hkv=2), "B=0": dict(b=0), "Hkv=0": dict(hkv=0),
    "Tq>Tk": dict(tq=9, tk=8), "H=Hkv=1 T=130": dict(h=1, hkv=1, tq=130),
}  # fmt: skip


def _shape_cases() -> list[Case]:
    names = ("head", "batch", "dim", "positions", "q has", "multiple", "empty", "d", "T")
    return [
        _attn("shape", shape, lambda kw=kw: _qkv(**kw), names, impl=impl)
        for shape, kw in SHAPES.items()
        for impl in ("auto", "tiled", "reference", "sparse", "decode")
    ]


def _strided(kind: str, tq: int, tk: int):
    q, k, v = _qkv(tq=tq, tk=tk, d=32)
    if kind == "last dim step 2":
        return q[..., ::2], k[..., ::2], v[..., ::2]
    q, k, v = (t[..., :16] for t in (q, k, v))
    if kind == "keys stored [B, H, D, T]":
        return q, k.transpose(-1, -2).contiguous().transpose(-1, -2), v
    if kind == "[B, T, H, D] transposed":
        return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    if kind == "batch expanded (stride 0)":
        return tuple(t.expand(3, -1, -1, -1) for t in (q, k, v))
    if kind == "keys expanded in time (stride 0)":
        return q, k[:, :, :1].expand(-1, -1, tk, -1), v
    return q, k, v.transpose(-1, -2).contiguous().transpose(-1, -2)  # values only


def _layout_cases() -> list[Case]:
    kinds = (
        "last dim step 2",
        "keys stored [B, H, D, T]",
        "[B, T, H, D] transposed",
        "batch expanded (stride 0)",
        "keys expanded in time (stride 0)",
        "values only",
    )
    plan = [(1, 9, ("auto", "decode", "decode_cpp")),
            (8, 8, ("auto", "sdpa", "tiled", "sparse", "sparse_cpp", "reference"))]  # fmt: skip
    return [
        _attn("layout", f"{kind} q_len={tq}", lambda kind=kind, tq=tq, tk=tk: _strided(kind, tq, tk),
              impl=impl)
        for kind in kinds for tq, tk, impls in plan for impl in impls
    ]  # fmt: skip


def _dtype_cases() -> list[Case]:
    plan = [(torch.bfloat16, ("auto", "tiled", "sparse_cpp", "sparse")),
            (torch.float64, ("auto", "sparse", "decode", "sparse_cpp")),
            (torch.float16, ("auto",)), (torch.int32, ("auto",)), (torch.bool, ("auto",)),
            (torch.complex64, ("auto",))]  # fmt: skip
    cases = []
    for dtype, impls in plan:
        for impl in impls:
            make = lambda dtype=dtype: tuple(t.to(dtype) for t in _qkv())  # noqa: E731
            cases.append(_attn("dtype", f"dtype={dtype}", make, ("dtype", "float"), impl=impl))
    make = lambda: (_qkv()[0], *(t.double() for t in _qkv()[1:]))  # noqa: E731
    cases.append(_attn("dtype", "q float32, k/v float64", make, ("dtype",)))
    return cases


def _poison(kind: str, value: float):
    """Inputs with ``value`` in one place, and the clean inputs the answer must equal."""
    q, k, v = _qkv(tq=1, tk=9)
    bad = [t.clone() for t in (q, k, v)]
    where = {"q": (0, 0, 0), "k": (1, 0, 0), "v": (2, 0, 0), "future k": (1, 8, 0)}[kind]
    bad[where[0]][:, :, where[1], where[2]] = value
    return tuple(bad), (q, k, v)


def _nan_cases() -> list[Case]:
    cases = []
    pad = {"kv_positions": torch.tensor([-1, *range(8)]), "q_positions": torch.tensor([7])}
    future = {"kv_positions": torch.arange(9), "q_positions": torch.tensor([3])}
    plan = [("q", float("nan"), {}, False), ("q", float("inf"), {}, False),
            ("k", float("nan"), pad, True), ("v", float("nan"), pad, True),
            ("k", float("inf"), pad, True),
            ("k", float("nan"), {"method": "sliding_window:window=3"}, True),
            ("v", float("inf"), {"method": "sliding_window:window=3"}, True),
            ("future k", float("inf"), future, True)]  # fmt: skip
    for kind, value, kw, clean in plan:
        for impl in ("auto", "tiled", "reference", "sparse", "decode"):
            where = "padding slot" if "kv_positions" in kw and kw is pad else "masked slot"
            desc = f"{value} in {kind}" + (f" at a {where}" if clean else "")
            make = lambda kind=kind, value=value: _poison(kind, value)[0]  # noqa: E731
            expect = (
                (lambda q, k, v, kind=kind, value=value: _poison(kind, value)[1]) if clean else None
            )
            cases.append(_attn("nan", desc, make, expect=expect, impl=impl, **kw))
    return cases


def _position_cases() -> list[Case]:
    t = torch.tensor
    plan = {
        "q at -2": dict(q_positions=t([0, 1, 2, 3, 4, 5, 6, -2])),
        "kv at -2": dict(kv_positions=t([-2, 1, 2, 3, 4, 5, 6, 7])),
        "duplicate kv": dict(kv_positions=t([0, 1, 2, 2, 3, 4, 5, 6])),
        "decreasing kv": dict(kv_positions=t([7, 6, 5, 4, 3, 2, 1, 0])),
        "q of 7": dict(q_positions=torch.arange(7)),
        "q [3, 8] for B=1": dict(q_positions=torch.arange(8).expand(3, 8)),
        "kv 3-D": dict(kv_positions=torch.arange(8).view(1, 1, 8)),
        "float q": dict(q_positions=torch.arange(8.0)),
        "bool kv": dict(kv_positions=torch.ones(8, dtype=torch.bool)),
        "list q": dict(q_positions=list(range(8))),
        "int32 positions": dict(q_positions=torch.arange(8, dtype=torch.int32),
                                kv_positions=torch.arange(8, dtype=torch.int32)),
        "q after every key": dict(q_positions=torch.arange(100, 108), kv_positions=torch.arange(8)),
        "q before every key": dict(q_positions=torch.arange(8), kv_positions=torch.arange(50, 58)),
        "every key padding": dict(q_positions=torch.arange(8), kv_positions=torch.full((8,), -1)),
        "q padding": dict(q_positions=t([-1] * 8), kv_positions=torch.arange(8)),
        "repeated q": dict(q_positions=t([7] * 8), kv_positions=torch.arange(8)),
        "huge gaps": dict(q_positions=t([2**40 + i for i in range(8)]),
                          kv_positions=t([2**40 + i for i in range(8)])),
    }  # fmt: skip
    cases = [_attn("positions", desc, _qkv, ("position",), **kw) for desc, kw in plan.items()]
    grid = "neighborhood2d:height=4,width=4,kernel=3"
    for last in (15, 16):  # a 4x4 grid holds positions 0..15
        kw = dict(q_positions=t([last]), kv_positions=torch.arange(last - 7, last + 1))
        make = lambda: _qkv(tq=1, tk=8)  # noqa: E731
        cases.append(_attn("positions", f"grid edge {last}", make, ("16",), method=grid, **kw))
    make = lambda: _qkv(tq=9, tk=8)  # noqa: E731
    kw = dict(q_positions=torch.arange(9), kv_positions=torch.arange(8))
    cases.append(_attn("positions", "Tq > Tk with positions", make, **kw))
    return cases


def _scale_cases() -> list[Case]:
    values = (0.0, -1.0, float("nan"), float("inf"), True, "1", 1, torch.tensor(0.5), 1e-30, 1e30)
    cases = []
    for scale in values:
        impls = ("auto", "tiled", "sparse", "decode") if scale in (0.0, -1.0, 1e30) else ("auto",)
        for impl in impls:
            make = (lambda: _qkv(tq=1, tk=9)) if impl == "decode" else _qkv
            cases.append(
                _attn("scale", f"scale={scale!r}", make, ("scale",), scale=scale, impl=impl)
            )
    for method in (3, "nope", object(), "dense:causal=maybe"):
        cases.append(_attn("scale", "bad method", _qkv, ("method", "causal"), method=method))
    from longattn.methods import Dense

    cases.append(_attn("scale", "method class, not instance", _qkv, ("method",), method=Dense))
    return cases


def _decode_setup(tq=1, t_new=1, h=4, dtype=torch.float32) -> dict:
    from longattn.cache import KVCache

    q, k, v = _qkv(h=h, tq=tq, tk=20 + t_new, dtype=dtype, seed=3)
    cache = KVCache(2, page_size=4)
    cache.append(0, k[:, :, :20].contiguous(), v[:, :, :20].contiguous())
    return {"cache": cache, "q": q, "k": k, "v": v, "new": (k[:, :, 20:], v[:, :, 20:])}


def _decode_case(desc, names=(), setup=_decode_setup, change=None, **kwargs) -> Case:
    """One step ``attention(q, k_new, v_new, cache=cache, **kwargs)`` on a cache holding 20 tokens;
    ``change(ctx)`` returns the (q, k_new, v_new) to pass instead."""

    def call(ctx):
        q, k_new, v_new = change(ctx) if change else (ctx["q"], *ctx["new"])
        return attention(q, k_new, v_new, cache=ctx["cache"], **kwargs)

    def check(ctx, result):
        okw = {key: val for key, val in kwargs.items() if key in ("method", "scale")}
        return compare(result, ctx["q"], ctx["k"], ctx["v"], okw)

    shown = ", ".join(f"{key}={_show(val)}" for key, val in kwargs.items())
    name = f"{desc} | attention(q, k_new, v_new, cache=<20 tokens>, {shown})"
    return Case("decode", name, setup, call, None if change else check, tuple(names), name)


QUEST = "quest:budget=8,page_size=4,dense_layers=0"
# refused decode steps: (what, words the error names, setup arguments, call arguments)
DECODE_REFUSALS = [
    ("unknown impl", ("fastest",), {}, dict(impl="fastest")),
    (
        "impl that cannot run",
        ("sdpa",),
        {},
        dict(impl="sdpa", method="sliding_window:window=5"),
    ),
    ("decode_cpp for a mask", ("decode",), {}, dict(impl="decode_cpp", method="power")),
    ("17 queries on decode", ("16", "17"), dict(tq=17, t_new=17), dict(impl="decode")),
    (
        "17 queries on quest decode",
        ("16", "17"),
        dict(tq=17, t_new=17),
        dict(impl="decode", method=QUEST),
    ),
    ("q heads 3", ("multiple",), dict(h=3), {}),
    ("q float64", ("dtype",), {}, dict(change=lambda c: (c["q"].double(), *c["new"]))),
    (
        "new keys Hkv=1",
        ("hold", "Hkv"),
        {},
        dict(change=lambda c: (c["q"], *(x[:, :1] for x in c["new"]))),
    ),
    ("scale nan", ("scale",), {}, dict(scale=float("nan"))),
    ("method 3", ("method",), {}, dict(method=3)),
    ("layer 5", ("layer",), {}, dict(layer=5)),
    ("q_positions of 2", ("q_positions",), {}, dict(q_positions=torch.arange(2))),
    ("q_positions at -2", ("q_positions", "-2"), {}, dict(q_positions=torch.tensor([-2]))),
    ("kv_positions already held", ("positions",), {}, dict(kv_positions=torch.tensor([3]))),
    (
        "quest page_size 8 on a 4-page cache",
        ("page",),
        {},
        dict(method="quest:budget=8,page_size=8,dense_layers=0"),
    ),
    ("2 queries, 1 new token", ("q_positions", "queries"), dict(tq=2), {}),
    (
        "reference of 17 queries over 16 new",
        ("q_positions",),
        dict(tq=17, t_new=16),
        dict(impl="reference"),
    ),
]


def _decode_cases() -> list[Case]:
    cases = [
        _decode_case("valid step", method=method, impl=impl)
        for method in (None, QUEST, "sliding_window:window=5", "streaming_llm:sinks=2,window=6")
        for impl in ("auto", "decode", "decode_cpp", "tiled", "reference", "sparse", "sdpa")
    ]
    transposed = lambda c: (c["q"], *(x.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
                                      for x in c["new"]))  # fmt: skip
    for desc, names, setup_kw, kw in DECODE_REFUSALS:
        setup = lambda setup_kw=setup_kw: _decode_setup(**setup_kw)  # noqa: E731
        cases.append(_decode_case(desc, names, setup, **kw))
    for impl in ("auto", "decode", "decode_cpp"):
        cases.append(_decode_case("transposed new keys", change=transposed, impl=impl))
    return cases


# ---------------------------------------------------------------- methods


def _method_case(desc: str, build, names=(), check=None) -> Case:
    return Case("method", desc, dict, lambda ctx: build(), check, tuple(names), desc)


def _accepted(ctx, result) -> str:
    """The check of an input that must be refused: returning anything is wrong."""
    return f"accepted, returned {result!r}"


def _round_trip(method) -> str | None:
    from longattn.method import from_string

    back = from_string(method.describe())
    return None if back == method else f"{method.describe()!r} parses back to {back!r}"


def _method_cases() -> list[Case]:
    import dataclasses

    from longattn import methods
    from longattn.method import from_string, registry
    from longattn.testing import METHOD_EXAMPLES

    cases = []
    for name, cls in registry().items():
        cases.append(_method_case(f"{name}() round trip", cls, check=lambda c, m: _round_trip(m)))
        for spec in METHOD_EXAMPLES.get(name, []):
            build = lambda spec=spec: from_string(spec)  # noqa: E731
            cases.append(_method_case(f"{spec!r} round trip", build,
                                      check=lambda c, m: _round_trip(m)))  # fmt: skip
        for f in dataclasses.fields(cls):
            if f.init and f.type in ("int", int):
                for value in ((-1,) if f.name != "seed" else ()) + ("3", 2.5, True):
                    build = lambda cls=cls, f=f, value=value: cls(**{f.name: value})  # noqa: E731
                    cases.append(_method_case(f"{cls.__name__}({f.name}={value!r})", build,
                                              (f.name,), _accepted))  # fmt: skip
    bad = ["", ":", "dense:causal=maybe", "dense:causal=2",
           "sliding_window:window=64,window=128", "sliding_window:window=-1",
           "sliding_window:window=1e3", "sliding_window:window=", "nosuch", "quest:budget=0",
           "quest:fraction=2", "strided:mode=x", "per_head_window:windows=4//8",
           "DENSE", 5, None]  # fmt: skip
    for spec in bad:
        words = [w.split("=")[0] for w in str(spec).replace(":", ",").split(",")] + ["spec"]
        cases.append(_method_case(f"from_string({spec!r})", lambda spec=spec: from_string(spec),
                                  (*filter(None, words), "method"), _accepted))  # fmt: skip
    for spec in ("dense:", "dense:causal=true,", " dense ", "loki:calibration=", "dense:causal=no"):
        build = lambda spec=spec: from_string(spec)  # noqa: E731
        cases.append(
            _method_case(f"from_string({spec!r})", build, check=lambda c, m: _round_trip(m))
        )
    for cls, kw in ((methods.Dense, {"causal": "no"}), (methods.Dense, {"causal": 1}),
                    (methods.Dense, {"causal": None}), (methods.SlidingWindow, {"causal": "false"}),
                    (methods.StaticBlocks, {"causal": 0})):  # fmt: skip
        build = lambda cls=cls, kw=kw: cls(**kw)  # noqa: E731
        cases.append(_method_case(f"{cls.__name__}(**{kw})", build, ("causal",), _accepted))
    return cases


# ---------------------------------------------------------------- sparse_attention


def _sparse_setup(q_len=8, kv_len=8, h=4, hkv=2, layout=None, partial=None, block=8) -> dict:
    from longattn.types import BlockIndex

    q, k, v = _qkv(h=h, hkv=hkv, tq=q_len, tk=kv_len)
    n_q, n_kv = -(-q_len // block), -(-kv_len // block)
    layout = torch.ones(1, 1, n_q, n_kv, dtype=torch.bool) if layout is None else layout
    index = BlockIndex.from_block_mask(layout, block, partial=partial, q_len=q_len, kv_len=kv_len)
    return {"q": q, "k": k, "v": v, "index": index, "kw": {"scale": 0.25}}


def _sparse_check(ctx, result) -> str | None:
    """The oracle of a full index without a mask: non-causal dense attention (padding aside)."""
    kw = {"method": "dense:causal=false", "scale": 0.25}
    for key, name in (("q_pos", "q_positions"), ("kv_pos", "kv_positions")):
        if key in ctx["kw"]:
            kw[name] = ctx["kw"][key]
    return compare(result, ctx["q"], ctx["k"], ctx["v"], kw)


def _sparse_cases() -> list[Case]:
    from longattn.kernels.sparse import sparse_attention

    def run(change):
        def call(ctx):
            args = change({"q": ctx["q"], "k": ctx["k"], "v": ctx["v"], "index": ctx["index"],
                           **ctx["kw"]})  # fmt: skip
            return sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("index"),
                                    **args)  # fmt: skip

        return call

    one = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    bad = {
        "3-D q": lambda a: {**a, "q": a["q"][0]},
        "heads 4 over 3": lambda a: {**a, "k": a["k"][:, :1].repeat(1, 3, 1, 1),
                                     "v": a["v"][:, :1].repeat(1, 3, 1, 1)},
        "index None": lambda a: {**a, "index": None},
        "scale 'big'": lambda a: {**a, "scale": "big"},
        "mask_fn 3": lambda a: {**a, "mask_fn": 3},
        "q_pos of 5": lambda a: {**a, "q_pos": torch.arange(5).view(1, -1)},
        "float kv_pos": lambda a: {**a, "kv_pos": torch.arange(8.0).view(1, -1)},
        "D=0": lambda a: {**a, **{n: a[n][..., :0] for n in "qkv"}},
        "index of another length": lambda a: {**a, "q": a["q"][:, :, :4]},
        "k/v float64": lambda a: {**a, "k": a["k"].double(), "v": a["v"].double()},
    }  # fmt: skip
    names = ("q ", "heads", "index", "scale", "mask_fn", "q_pos", "kv_pos", "head_dim", "q_len",
             "dtype")  # fmt: skip
    cases = [Case("sparse", f"sparse_attention: {d}", _sparse_setup, run(ch), None, names, d)
             for d, ch in bad.items()]  # fmt: skip
    good = {
        "full index": {},
        "partial, mask_fn=None": dict(partial=one),
        "q_len 6 (padded)": dict(q_len=6, kv_len=8),
        "block 128 over T=8": dict(block=128),
        "per-head index": dict(layout=torch.ones(1, 4, 1, 1, dtype=torch.bool)),
        "nothing visited": dict(layout=torch.zeros(1, 1, 1, 1, dtype=torch.bool)),
    }
    for desc, kw in good.items():
        setup = lambda kw=kw: _sparse_setup(**kw)  # noqa: E731
        check = _nothing_check if desc == "nothing visited" else _sparse_check
        cases.append(Case("sparse", f"sparse_attention: {desc}", setup, run(lambda a: a), check,
                          (), desc))  # fmt: skip
    return cases


def _nothing_check(ctx, result) -> str | None:
    if bool(result.out.eq(0).all()) and bool(torch.isneginf(result.lse).all()):
        return None
    return "a query that visits no block must get out = 0 and lse = -inf"


# ---------------------------------------------------------------- calibration files and the CLI

_TMP: list = []


def _tmp() -> pathlib.Path:
    """One temporary folder per process for the files the cases write."""
    if not _TMP:
        _TMP.append(tempfile.TemporaryDirectory(prefix="longattn-sweep-"))
    return pathlib.Path(_TMP[0].name)


def _calibration_file(kind: str) -> pathlib.Path:
    from safetensors.torch import save_file

    from longattn.calibration import Calibration

    path = _tmp() / f"{kind.replace(' ', '_')}.safetensors"
    good = Calibration("loki", "m", 2, 2, 16, {"basis": torch.randn(2, 2, 16, 16)}, {})
    raw = good.save(_tmp() / "good.safetensors").read_bytes()
    meta = good.metadata()
    header = {"bad json": "{nope", "list header": "[1]", "no fields": "{}",
              "string n_layers": json.dumps({**meta, "n_layers": "two"}),
              "version 7": json.dumps({**meta, "version": 7})}  # fmt: skip
    if kind in header:
        save_file(
            {"basis": torch.randn(2, 2, 16, 16)}, str(path), metadata={"longattn": header[kind]}
        )
    elif kind == "wrong layers":
        Calibration("loki", "m", 3, 2, 16, {"basis": torch.randn(3, 2, 16, 16)}, {}).save(path)
    elif kind == "wrong tensor name":
        Calibration("loki", "m", 2, 2, 16, {"other": torch.randn(2, 2, 16, 16)}, {}).save(path)
    elif kind == "directory":
        path.mkdir(exist_ok=True)
    elif kind != "missing":
        data = {"truncated": raw[: len(raw) // 2], "empty": b"", "text": b"hello, not a file"}
        path.write_bytes(data.get(kind, raw))
    return path


CALIBRATION_KINDS = ("truncated", "empty", "text", "bad json", "list header", "no fields",
                     "string n_layers", "version 7", "wrong layers", "wrong tensor name",
                     "directory", "missing", "good")  # fmt: skip


def _calibration_cases() -> list[Case]:
    from longattn import calibration, methods

    cases = []
    for kind in CALIBRATION_KINDS:
        setup = lambda kind=kind: {"path": _calibration_file(kind)}  # noqa: E731
        cases.append(Case("calibration", f"calibration.load: {kind}", setup,
                          lambda c: calibration.load(c["path"]), None, ("safetensors",),
                          kind))  # fmt: skip
        if kind in ("good", "directory"):
            continue

        def step(ctx):
            method = methods.Loki(budget=4, rank=4, calibration=str(ctx["path"]))
            return attention(ctx["q"], *ctx["new"], cache=ctx["cache"], method=method)

        def setup_step(kind=kind):
            return {**_decode_setup(), "path": _calibration_file(kind)}

        cases.append(Case("calibration", f"decode step with Loki calibration: {kind}", setup_step,
                          step, None, ("safetensors", "calibration", "does not exist"),
                          kind))  # fmt: skip
    cases.append(_method_case("Loki(calibration=123)", lambda: methods.Loki(calibration=123),
                              ("123",), _accepted))  # fmt: skip
    return cases


def _cli_cases() -> list[Case]:
    out = "{tmp}/out"
    argvs = [
        ["bench", "--length", "0"], ["bench", "--length", "-5"], ["bench", "--length", "ten"],
        ["bench", "--heads", "0"], ["bench", "--dim", "0"], ["bench", "--memory-length", "0"],
        ["bench", "kernels", "--dtypes", "float16"], ["bench", "kernels", "--length", "100"],
        ["bench", "nosuch"], ["nosuch"], [], ["docs", "--out", "{tmp}/missing/dir/x.md"],
        ["docs", "--out", "{tmp}"], ["eval"], ["eval", "--out", out, "--samples", "0"],
        ["eval", "--out", out, "--lengths", "abc"], ["eval", "--out", out, "--lengths", ","],
        ["eval", "--out", out, "--lengths", "0"], ["eval", "--out", out, "--depths", "x"],
        ["eval", "--out", out, "--depths", "2"], ["eval", "--out", out, "--methods", "nosuch"],
        ["eval", "--out", out, "--methods", "sliding_window:window=0"],
        ["eval", "--out", out, "--corpus", "nosuch"], ["eval", "--out", out, "--tasks", "nosuch"],
        ["eval", "--out", out, "--force", "--resume"], ["eval", "--out", out, "--preset", "x"],
        ["eval", "--out", out, "--new-tokens", "0"], ["plot", "{tmp}/nonexistent"],
        ["analyze", "--out", out, "--window", "0"], ["analyze", "--out", out, "--length", "abc"],
        ["analyze", "--out", out, "--corpus", "nosuch"],
        ["analyze", "--out", "{tmp}/good.safetensors"],
    ]  # fmt: skip
    cases = []
    for argv in argvs:
        words = [a for a in argv if a.startswith("--")][-1:] or ["usage", "invalid", "required"]

        def call(ctx, argv=argv):
            _calibration_file("good")
            return run_cli([a.format(tmp=_tmp()) for a in argv])

        shown = "longattn " + " ".join(argv)
        cases.append(Case("cli", shown, dict, call, None, (*words, "error"), shown))
    return cases


def all_cases() -> list[Case]:
    """Every case of the sweep, in a fixed order with unique names."""
    cases = (_impl_cases() + _shape_cases() + _layout_cases() + _dtype_cases() + _nan_cases()
             + _position_cases() + _scale_cases() + cache_api_cases() + _decode_cases()
             + _method_cases() + _sparse_cases() + _calibration_cases() + _cli_cases())  # fmt: skip
    seen: dict[str, int] = {}
    unique = []
    for case in cases:
        n = seen[case.name] = seen.get(case.name, 0) + 1
        unique.append(case if n == 1 else dataclasses.replace(case, name=f"{case.name} #{n}"))
    return unique
