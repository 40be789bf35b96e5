"""``longattn distill``: attention transfer of a real model to Hedgehog feature maps with a small
exact sliding window. Hedgehog: Zhang et al. 2024, arXiv:2402.04347; LoLCATs: Zhang et al. 2024,
arXiv:2410.10254.

Every layer is trained on its own. Its inputs are the original model's post-RoPE q/k/v on real text
(``capture_qkv``), its target the model's own causal softmax attention output on those q/k/v. The
student is what ``Hedgehog(calibration=..., window=W)`` computes at run time: the keys within W
tokens of a query by exact ``exp(scale q.k)``, the older ones by ``phi(q) . phi(k)``, one shared
normaliser; ``phi`` is ``Hedgehog.feature_map`` itself (one W [D, F] per query head, ``q_proj``,
and per KV head, ``k_proj``, the identity at the start as in the paper). MSE loss, AdamW, a cosine
learning rate. A step reads a random sample of the queries beyond the window (every key still
enters it), so it costs O(rows * T) rather than O(T^2) and its loss is unbiased for the full one.
Deviation from paper: LoLCATs weighs its window and linear terms by a learned per-head factor;
here the two terms are weighed as the library's engine evaluates them (no factor). Hedgehog trains
on the attention weights with a cross-entropy; this is LoLCATs' MSE on the outputs.

Heads that park their mass on the first token (an attention sink) cannot be matched by the
linear part once it leaves the window: Hedgehog's features are bounded and the window's terms are
not (docs/runs/issue15/distill.md). The first ``sinks`` tokens therefore stay exact beside the
window, as ``Hedgehog(sinks=...)`` runs them.

The result is a ``longattn.calibration`` file: ``q_proj`` [L, Hkv, G, D, F] (G query heads per KV
head) and ``k_proj`` [L, Hkv, D, F], the settings and each layer's held-out output error.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from longattn.eval.lora import LoraSettings, lora_pass
from longattn.eval.tasks import disjoint_windows

METHOD = "hedgehog"
HELDOUT_SEED = 10_000  # first text_window seed of the held-out windows (training starts at 0)
ROW_BLOCKS = 4  # row blocks of windowed_linear
ERRORS = ("init", "trained", "window_only", "power")  # per layer, on held-out text


@dataclass(frozen=True)
class DistillSettings:
    """What a distillation depends on (a checkpoint resumes only under the same settings).

    length: tokens per text window; windows: training windows (one per step, in turn); steps:
    optimiser steps per layer; rows: queries sampled per step; window: the exact sliding window;
    sinks: the first tokens, exact beside the window; features: F, each half of the feature map
    (2F features in all). The defaults are the run of docs/runs/issue15/distill.md (a 2,048-token
    perplexity within 20 % of the original's, about 17 minutes on 2 cores); LoLCATs' window of 64
    is well short of that on this model (the table there)."""

    model: str = "smollm2-135m"
    corpus: str = "pydoc"
    length: int = 1024
    windows: int = 4
    steps: int = 40
    rows: int = 256
    lr: float = 0.01
    weight_decay: float = 0.0
    window: int = 256
    sinks: int = 4
    features: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("length", "windows", "steps", "rows", "window", "features", "sinks"):
            value, least = getattr(self, key), int(key != "sinks")  # sinks may be 0
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                bound = "> 0" if least else ">= 0"
                raise ValueError(f"DistillSettings.{key} must be an int {bound}, got {value!r}")
        if self.length <= self.window:
            raise ValueError(
                f"DistillSettings.length={self.length} must exceed window={self.window}: "
                "no query would reach the linear part"
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"DistillSettings.lr must be a finite float > 0, got {self.lr!r}")
        if not self.weight_decay >= 0:
            raise ValueError(
                f"DistillSettings.weight_decay must be >= 0, got {self.weight_decay!r}"
            )

    def lr_at(self, step: int) -> float:
        """Cosine from ``lr`` down to a tenth of it over ``steps``."""
        return self.lr * (0.55 + 0.45 * math.cos(math.pi * step / self.steps))


def model_shape(config) -> tuple[int, int, int, int]:
    """(n_layers, n_heads, n_kv_heads, head_dim) of a transformers config."""
    n_heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return config.num_hidden_layers, n_heads, config.num_key_value_heads, dim


def attention_scales(model: torch.nn.Module) -> dict[int, float]:
    """Each layer's softmax scale, as its attention module passes it (``scaling``)."""
    return {
        m.layer_idx: float(m.scaling)
        for m in model.modules()
        if hasattr(m, "layer_idx") and isinstance(getattr(m, "scaling", None), float)
    }


def softmax_attention(q, k, v, scale: float) -> torch.Tensor:
    """The model's own causal attention on captured q [B, H, T, D], k/v [B, Hkv, T, D]."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))  # once per window, off the hot path
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


@torch.no_grad()
def capture_layers(
    model, windows: Sequence[Sequence[int]], layers: Sequence[int], scales: dict[int, float]
) -> dict[int, list[tuple[torch.Tensor, ...]]]:
    """``{layer: [(q, k, v, target) per window]}``: the original model's float32 q/k/v and its
    softmax output (the target) on each window."""
    from longattn.integrations.hf import capture_qkv

    data: dict[int, list[tuple[torch.Tensor, ...]]] = {layer: [] for layer in layers}
    for ids in windows:
        captured = capture_qkv(model, torch.tensor([list(ids)]), layers=list(layers))
        for layer in layers:
            q, k, v = (x.float() for x in captured.pop(layer))
            data[layer].append((q, k, v, softmax_attention(q, k, v, scales[layer])))
    return data


def hedgehog_features(x: torch.Tensor, wq, wk, role: str, layer: int, scale: float):
    """``Hedgehog.feature_map`` of ``x`` [B, heads, T, D] (queries or keys, by ``role``) under
    the maps wq [H, D, F] and wk [Hkv, D, F] (differentiable in both): the map the converted model
    runs, given this layer's calibration tensors as the file holds them."""
    from longattn.methods.hedgehog import Hedgehog
    from longattn.types import FeatureView

    n_kv, dim, features = wk.shape
    tensors = {"q_proj": wq.view(n_kv, -1, dim, features), "k_proj": wk}  # [Hkv, G, D, F]
    view = FeatureView(role, layer, scale, tensors)
    return Hedgehog(features=features).feature_map(x, view)


def exact_window(q, pos, k, v, scale: float, window: int, sinks: int = 0):
    """The exact part of windowed linear attention at the query rows ``pos`` [n]: over the keys
    s with ``0 <= pos - s < window`` and the sinks ``s < sinks <= pos``, ``sum exp(scale q.k_s -
    shift) [v_s, 1]`` and the shift.

    q [B, H, n, D] (the rows' queries), k [B, Hkv, T, D], v [B, Hkv, T, Dv]. Returns
    ([B, Hkv, G*n, Dv + 1], shift [B, Hkv, G*n, 1]), rows ordered (query head in group, row). The
    shift is the row's largest window score, at least 0: no term overflows, and the linear part
    (weighed by exp(-shift)) cannot either."""
    batch, n_heads, n_rows, dim = q.shape
    n_kv = k.shape[1]
    group = n_heads // n_kv
    idx = pos[:, None] - torch.arange(window, device=q.device)[None, :]  # [n, W]: newest first
    valid = idx >= 0
    if sinks:  # the sinks older than the window
        sink = torch.arange(sinks, device=q.device).expand(len(pos), sinks)
        valid = torch.cat([valid, pos[:, None] - sink >= window], dim=1)
        idx = torch.cat([idx, sink], dim=1)
    idx = idx.clamp_min(0)
    keys = k[:, :, idx]  # [B, Hkv, n, W, D]
    values = with_ones(v)[:, :, idx]  # [B, Hkv, n, W, Dv + 1]
    qg = q.reshape(batch, n_kv, group, n_rows, dim)  # [B, Hkv, G, n, D]
    scores = torch.einsum("bhgnd,bhnwd->bhgnw", qg, keys) * scale  # [B, Hkv, G, n, W]
    scores = scores.masked_fill(~valid, -torch.inf)
    shift = scores.amax(-1, keepdim=True).clamp_min(0.0)
    num = torch.einsum("bhgnw,bhnwe->bhgne", torch.exp(scores - shift), values)
    return num.reshape(batch, n_kv, group * n_rows, -1), shift.reshape(batch, n_kv, -1, 1)


def with_ones(v: torch.Tensor) -> torch.Tensor:
    """[..., Dv] -> [..., Dv + 1]: a ones column, so one product gives numerator and normaliser."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def windowed_linear(phi_q, pos, phi_k, values, exact, window: int, sinks: int = 0):
    """Windowed linear attention (LoLCATs' form, as the engine evaluates it) at the query rows
    ``pos`` [n] (positions, ascending): keys s with ``0 <= pos - s < window`` weigh
    ``exp(scale q.k_s)`` (``exact``: ``exact_window`` of the rows), older ones
    ``phi(q) . phi(k_s)`` (but the first ``sinks``: exact, in ``exact``), under one shared
    normaliser.

    phi_q [B, H, n, F] of the rows; phi_k [B, Hkv, T, F] and ``values`` [B, Hkv, T, Dv + 1]
    (``with_ones(v)``) of every key. Returns [B, H, n, Dv]. Quadratic in form (a training loss on
    a sample of rows), differentiable in the features. The rows go in ``ROW_BLOCKS`` blocks, each
    against the keys old enough for its last row only (causality: about half the work)."""
    batch, n_heads, n_rows, _ = phi_q.shape
    n_kv = phi_k.shape[1]
    group = n_heads // n_kv
    num, shift = (x.view(batch, n_kv, group, n_rows, -1) for x in exact)  # [B, Hkv, G, n, .]
    pf = phi_q.view(batch, n_kv, group, n_rows, -1)  # [B, Hkv, G, n, F]: a KV head's group
    parts = []
    for lo, hi in _blocks(n_rows):
        limit = int(pos[hi - 1]) - window + 1  # keys [0, limit) are old for some row
        if limit <= 0:
            parts.append(num[:, :, :, lo:hi])
            continue
        age = pos[lo:hi, None] - torch.arange(limit, device=pos.device)[None, :]  # [nb, limit]
        old = (age >= window) & (torch.arange(limit, device=pos.device) >= sinks)
        weight = old * torch.exp(-shift[:, :, :, lo:hi])  # [B, Hkv, G, nb, limit]
        block = pf[:, :, :, lo:hi].reshape(batch, n_kv, group * (hi - lo), -1)  # [B, Hkv, G*nb, F]
        linear = (block @ phi_k[:, :, :limit].transpose(-1, -2)).view(weight.shape) * weight
        linear = linear.view(batch, n_kv, -1, limit) @ values[:, :, :limit]  # [B, Hkv, G*nb, .]
        parts.append(num[:, :, :, lo:hi] + linear.view(batch, n_kv, group, hi - lo, -1))
    total = torch.cat(parts, dim=3)  # [B, Hkv, G, n, Dv + 1]
    out = total[..., :-1] / total[..., -1:]
    return out.reshape(batch, n_heads, n_rows, -1)


def _blocks(n: int) -> list[tuple[int, int]]:
    """``ROW_BLOCKS`` contiguous, non-empty [lo, hi) ranges covering ``range(n)``."""
    edges = [n * i // ROW_BLOCKS for i in range(ROW_BLOCKS + 1)]
    return [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]


@dataclass(frozen=True)
class Window:
    """One text window of one layer, ready for training: q [B, H, T, D], k [B, Hkv, T, D],
    ``values`` [B, Hkv, T, Dv + 1] (``with_ones(v)``), the target [B, H, T, Dv] and the exact
    window part of every row (``exact_window``: it does not depend on the maps)."""

    q: torch.Tensor
    k: torch.Tensor
    values: torch.Tensor
    target: torch.Tensor
    exact: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    @torch.no_grad()
    def prepare(cls, q, k, v, target, scale: float, window: int, sinks: int = 0) -> Window:
        pos = torch.arange(q.shape[2])
        return cls(q, k, with_ones(v), target, exact_window(q, pos, k, v, scale, window, sinks))

    def exact_rows(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact part at the rows ``pos``, ordered (query head in group, row)."""
        batch, n_kv, _, width = self.exact[0].shape
        group, n_keys = self.q.shape[1] // n_kv, self.q.shape[2]
        return tuple(
            x.view(batch, n_kv, group, n_keys, -1)[:, :, :, pos].reshape(
                batch, n_kv, -1, x.shape[-1]
            )
            for x in self.exact
        )


def student(data: Window, pos, wq, wk, layer: int, scale: float, span: tuple[int, int]):
    """The converted layer's output [B, H, n, Dv] at the query rows ``pos`` [n] of ``data``;
    ``span``: (window, sinks)."""
    phi_q = hedgehog_features(data.q[:, :, pos], wq, wk, "query", layer, scale)
    phi_k = hedgehog_features(data.k, wq, wk, "key", layer, scale)
    return windowed_linear(phi_q, pos, phi_k, data.values, data.exact_rows(pos), *span)


def identity_weights(n_heads: int, n_kv: int, dim: int, features: int):
    """The paper's initialisation: ``eye(D, F)`` for every query head (wq) and KV head (wk)."""
    eye = torch.eye(dim, features)
    return eye.expand(n_heads, dim, features).clone(), eye.expand(n_kv, dim, features).clone()


def train_layer(
    data: Sequence[Window],
    settings: DistillSettings,
    layer: int,
    scale: float,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one layer's maps on its windows ``data``; returns (wq [H, D, F], wk [Hkv, D, F]).
    Deterministic in (settings.seed, layer)."""
    _, n_heads, n_keys, dim = data[0].q.shape
    wq, wk = (torch.nn.Parameter(w) for w in identity_weights(
        n_heads, data[0].k.shape[1], dim, settings.features))  # fmt: skip
    optimizer = torch.optim.AdamW([wq, wk], lr=settings.lr, weight_decay=settings.weight_decay)
    gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + layer)
    n_rows = min(settings.rows, n_keys - settings.window)
    for step in range(settings.steps):
        part = data[step % len(data)]
        pos = torch.randperm(n_keys - settings.window, generator=gen)[:n_rows].sort().values
        pos = pos + settings.window  # rows the linear part reaches
        for group in optimizer.param_groups:
            group["lr"] = settings.lr_at(step)
        out = student(part, pos, wq, wk, layer, scale, (settings.window, settings.sinks))
        loss = (out - part.target[:, :, pos]).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if not math.isfinite(loss.item()):
            raise ValueError(f"layer {layer}: the loss is {loss.item()} at step {step}")
        if on_step is not None:
            on_step(step + 1, loss.item())
    return wq.detach().clone(), wk.detach().clone()


@torch.no_grad()
def layer_errors(
    data: Sequence[Window], wq, wk, layer: int, scale: float, span: tuple[int, int]
) -> dict[str, float]:
    """Mean squared output error over the queries beyond the window of ``data`` (held-out
    windows) for: the identity maps (``init``), the trained ones, the window (and sinks) alone
    (no linear part), and the target's mean square (``power``: the error of outputting zeros)."""
    init = identity_weights(wq.shape[0], wk.shape[0], wq.shape[1], wq.shape[2])
    sums = dict.fromkeys(ERRORS, 0.0)
    count = 0
    for part in data:
        pos = torch.arange(span[0], part.q.shape[2])
        want = part.target[:, :, pos]
        for name, (a, b) in (("init", init), ("trained", (wq, wk))):
            sums[name] += (student(part, pos, a, b, layer, scale, span) - want).pow(2).sum()
        num = part.exact_rows(pos)[0]
        alone = (num[..., :-1] / num[..., -1:]).reshape(want.shape)  # [B, H, n, Dv]
        sums["window_only"] += (alone - want).pow(2).sum()
        sums["power"] += want.pow(2).sum()
        count += want.numel()
    return {name: float(total) / count for name, total in sums.items()}


def _load_checkpoint(path: pathlib.Path, identity: dict) -> dict[int, dict[str, torch.Tensor]]:
    """The finished layers of a checkpoint made under ``identity`` (settings and model shape);
    ValueError for one made under others (it is never silently discarded)."""
    if not path.is_file():
        return {}
    from safetensors import safe_open

    from longattn.calibration import META_KEY

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get(META_KEY, "{}"))
        tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    if meta.get("identity") != json.loads(json.dumps(identity)):
        raise ValueError(
            f"checkpoint {path} was made with {meta.get('identity')}, not {identity}: "
            "remove it or write elsewhere"
        )
    done: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        layer, name = key.split(".", 1)
        done.setdefault(int(layer), {})[name] = t
    return done


def _save_checkpoint(path: pathlib.Path, identity: dict, done: dict) -> None:
    from safetensors.torch import save_file

    from longattn.calibration import META_KEY

    tensors = {f"{layer}.{name}": t for layer, part in done.items() for name, t in part.items()}
    partial = path.with_name(path.name + ".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(partial), metadata={META_KEY: json.dumps({"identity": identity})})
    partial.replace(path)  # a run killed mid-write never leaves a torn checkpoint


def _calibration(done: dict, settings: DistillSettings, shape: tuple[int, ...], extra: dict):
    from longattn.calibration import Calibration

    n_layers, n_heads, n_kv, dim = shape
    q_proj = torch.stack([done[i]["q_proj"] for i in range(n_layers)])  # [L, H, D, F]
    k_proj = torch.stack([done[i]["k_proj"] for i in range(n_layers)])  # [L, Hkv, D, F]
    tensors = {
        "q_proj": q_proj.view(n_layers, n_kv, n_heads // n_kv, dim, -1),  # [L, Hkv, G, D, F]
        "k_proj": k_proj,
    }
    errors = {
        name: [float(done[i]["errors"][j]) for i in range(n_layers)]
        for j, name in enumerate(ERRORS)
    }
    seconds = sum(float(done[i]["seconds"]) for i in range(n_layers))
    params = {**asdict(settings), "mse": errors, "train_s": round(seconds, 1), **extra}
    return Calibration(METHOD, settings.model, n_layers, n_kv, dim, tensors, params)


def check_calibration(cal, config) -> None:
    """Refuse a calibration that is not Hedgehog maps for this model's shape (ValueError)."""
    n_layers, n_heads, n_kv, dim = model_shape(config)
    cal.check(METHOD, n_layers, n_kv, dim)
    want = {"q_proj": (n_layers, n_kv, n_heads // n_kv, dim), "k_proj": (n_layers, n_kv, dim)}
    for name, lead in want.items():
        t = cal.tensors.get(name)
        if t is None or tuple(t.shape[:-1]) != lead or not t.is_floating_point():
            got = None if t is None else (tuple(t.shape), t.dtype)
            raise ValueError(
                f"Hedgehog calibration tensor {name!r} must be floating [{', '.join(map(str, lead))}"
                f", F] for model {cal.model!r} with {n_heads} query heads, got {got}"
            )
    if cal.tensors["q_proj"].shape[-1] != cal.tensors["k_proj"].shape[-1]:
        raise ValueError("Hedgehog calibration q_proj and k_proj must have the same F")


def distill(
    model,
    tokenizer,
    settings: DistillSettings,
    out: pathlib.Path,
    *,
    max_layers: int | None = None,
    on_step: Callable[[int, dict], None] | None = None,
):
    """Distil every layer of ``model``; after each layer ``<out>.checkpoint`` holds the finished
    ones (a rerun with the same settings continues at the next layer). ``max_layers``: train at
    most that many layers in this call. Returns the ``Calibration`` written to ``out`` once every
    layer is done, else None (the checkpoint stays)."""
    shape = model_shape(model.config)
    identity = {**asdict(settings), "shape": list(shape)}
    checkpoint = out.with_name(out.name + ".checkpoint")
    done = _load_checkpoint(checkpoint, identity)
    todo = [layer for layer in range(shape[0]) if layer not in done][:max_layers]
    if todo:
        train, heldout = _layer_data(model, tokenizer, settings, todo)
    scales = attention_scales(model)
    for layer in todo:
        start = time.perf_counter()
        offset = len(done) * settings.steps

        def report(step: int, loss: float, layer=layer, offset=offset) -> None:
            if on_step is not None:
                on_step(offset + step, {"layer": layer, "mse": loss})

        scale = scales[layer]
        span = (settings.window, settings.sinks)
        prepared = [Window.prepare(*x, scale, *span) for x in train.pop(layer)]
        wq, wk = train_layer(prepared, settings, layer, scale, report)
        seconds = time.perf_counter() - start  # training alone: the held-out check is extra
        prepared = [Window.prepare(*x, scale, *span) for x in heldout.pop(layer)]
        errors = layer_errors(prepared, wq, wk, layer, scale, span)
        done[layer] = {"q_proj": wq, "k_proj": wk, "seconds": torch.tensor(seconds),
                       "errors": torch.tensor([errors[name] for name in ERRORS])}  # fmt: skip
        _save_checkpoint(checkpoint, identity, done)
    if len(done) < shape[0]:
        return None
    cal = _calibration(done, settings, shape, {"threads": torch.get_num_threads()})
    cal.save(out)
    checkpoint.unlink(missing_ok=True)
    return cal


def _layer_data(model, tokenizer, settings: DistillSettings, layers: Sequence[int]):
    """(training data, held-out data) of ``layers``: q/k/v and targets on disjoint windows."""
    train_ids = disjoint_windows(tokenizer, settings.corpus, settings.length, settings.windows,
                                 seed=settings.seed)  # fmt: skip
    held_ids = disjoint_windows(tokenizer, settings.corpus, settings.length, 1, train_ids,
                                seed=HELDOUT_SEED + settings.seed)  # fmt: skip
    scales = attention_scales(model)
    return (capture_layers(model, train_ids, layers, scales),
            capture_layers(model, held_ids, layers, scales))  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``longattn distill`` (defaults: ``DistillSettings``)."""
    from longattn.eval.commands import positive_int

    d = DistillSettings()
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--out", required=True, help="the calibration file (.safetensors)")
    parser.add_argument("--corpus", default=d.corpus, help=f"pydoc, licenses or kjv ({d.corpus})")
    for name, kind, text in (
        ("length", positive_int, "tokens per text window"),
        ("windows", positive_int, "training windows"),
        ("steps", positive_int, "optimiser steps per layer"),
        ("rows", positive_int, "queries sampled per step"),
        ("window", positive_int, "exact sliding window"),
        ("sinks", int, "first tokens kept exact beside the window"),
        ("features", positive_int, "F, each half of the feature map"),
        ("lr", float, "peak learning rate"),
        ("weight-decay", float, "AdamW weight decay"),
        ("seed", int, "seed of the text windows and the row samples"),
    ):
        default = getattr(d, name.replace("-", "_"))
        parser.add_argument(f"--{name}", type=kind, default=default, help=f"{text} ({default})")
    parser.add_argument("--threads", type=positive_int, default=2, help="torch threads (2)")
    parser.add_argument(
        "--max-layers", type=positive_int, default=None,
        help="train at most this many layers now (the checkpoint keeps them; rerun to continue)",
    )  # fmt: skip
    lora = LoraSettings()
    parser.add_argument(
        "--lora-steps",
        type=int,
        default=lora.steps,
        help="then a LoRA pass of this many steps (0: none), adapter in <out>.lora",
    )
    parser.add_argument("--lora-rank", type=positive_int, default=lora.rank)
    parser.add_argument("--lora-lr", type=float, default=lora.lr)
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def _run_lora(model, tokenizer, settings, lora: LoraSettings, out: pathlib.Path, args):
    from longattn.eval.calibrate import _progress
    from longattn.methods.hedgehog import Hedgehog

    method = Hedgehog(calibration=str(out), window=settings.window, sinks=settings.sinks)
    windows = disjoint_windows(tokenizer, settings.corpus, settings.length, settings.windows,
                               seed=settings.seed)  # fmt: skip
    with _progress(args.progress, lora.steps, "LoRA steps") as report:
        return lora_pass(model, method, windows, lora, out.with_name(out.name + ".lora"), report)


def run_command(args: argparse.Namespace) -> int:
    from longattn.eval.calibrate import _progress
    from longattn.eval.commands import USER_ERRORS, _fail
    from longattn.eval.models import load

    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    try:
        settings = DistillSettings(
            model=args.model, corpus=args.corpus, length=args.length, windows=args.windows,
            steps=args.steps, rows=args.rows, lr=args.lr, weight_decay=args.weight_decay,
            window=args.window, sinks=args.sinks, features=args.features, seed=args.seed,
        )  # fmt: skip
        lora = LoraSettings(steps=args.lora_steps, rank=args.lora_rank, lr=args.lora_lr)
        model, tokenizer = load(settings.model)
        total = model.config.num_hidden_layers * settings.steps
        with _progress(args.progress, total, "distill steps") as report:
            cal = distill(model, tokenizer, settings, pathlib.Path(args.out),
                          max_layers=args.max_layers, on_step=report)  # fmt: skip
        if cal is not None and lora.steps:
            losses = _run_lora(model, tokenizer, settings, lora, pathlib.Path(args.out), args)
            print(f"LoRA loss {losses[0]:.3f} -> {losses[-1]:.3f}, adapter in {args.out}.lora")
    except USER_ERRORS as exc:
        return _fail("distill", exc)
    seconds = time.perf_counter() - start
    if cal is None:
        print(f"checkpoint {args.out}.checkpoint updated in {seconds:.0f} s; rerun to continue")
        return 0
    print(f"wrote {args.out} in {seconds:.0f} s (training {cal.params['train_s']:.0f} s)")
    return 0
