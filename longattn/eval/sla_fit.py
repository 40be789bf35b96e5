"""``longattn calibrate sla``: the short fine-tune of SLA's linear part on a real model.

The paper adds the linear output through a learned projection (``O = O_sparse + Proj(O_linear)``)
and trains it with the model. Here the projection is fitted per layer and query head to the
model's own causal softmax outputs on real text, in closed form: SLA's output under a map
``(W, b)`` of its marginal part is, row by row, ``c + W x + s b`` with ``c`` the critical part,
``s`` the marginal share of the normaliser and ``x = s a`` (``a`` the marginal average), all
independent of the map. Three calls of the method itself give them (map zero; ``b`` ones;
identity), so the fit reads no internals. The least-squares problem ``min |y - c - W x - s b|^2
+ lam (|W - I|^2 + |b|^2)`` (``lam`` = ``ridge`` times the mean diagonal of the layer's Gram
matrices, so the ridge pulls towards the training-free form) is solved from the Gram matrices
summed over the training windows. The output error of SLA with and without the map is then
measured on held-out windows (no run of 32 tokens shared with the training text), per layer.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from longattn.bench.linear_error import softmax_reference
from longattn.calibration import Calibration
from longattn.method import check_non_negative, check_positive
from longattn.methods.sla import PROJ_B, PROJ_W, SLA
from longattn.types import FeatureView

HELDOUT_SEED = 10_000  # first text_window seed of the held-out windows (training starts at 0)


@dataclass(frozen=True)
class SlaFitSettings:
    """What a fit depends on. length: tokens per text window; windows / heldout: training and
    held-out windows; ridge: the pull towards the identity map (times the mean diagonal of the
    layer's Gram matrices); block_size, critical, marginal, sink_blocks, points: the SLA the map
    is fitted for (the expansion form); seed: the first text window's seed (held-out ones from
    ``HELDOUT_SEED`` + seed)."""

    model: str = "smollm2-135m"
    corpus: str = "pydoc"
    length: int = 2048
    windows: int = 4
    heldout: int = 1
    ridge: float = 1.0
    block_size: int = 64
    critical: float = 0.1
    marginal: float = 0.9
    sink_blocks: int = 1
    points: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive(name, length=self.length, windows=self.windows, heldout=self.heldout)
        check_non_negative(name, seed=self.seed)
        if isinstance(self.ridge, bool) or not isinstance(self.ridge, (int, float)):
            raise TypeError(f"SlaFitSettings.ridge must be a float, got {self.ridge!r}")
        if not self.ridge > 0:
            raise ValueError(f"SlaFitSettings.ridge must be > 0, got {self.ridge}")
        self.method()  # SLA's own checks of the budgets

    def method(self) -> SLA:
        return SLA(
            block_size=self.block_size, critical=self.critical, marginal=self.marginal,
            sink_blocks=self.sink_blocks, points=self.points,
        )  # fmt: skip


def _maps(n_kv: int, group: int, dim_v: int) -> dict[str, dict[str, torch.Tensor]]:
    zero_w = torch.zeros(n_kv, group, dim_v, dim_v)
    zero_b = torch.zeros(n_kv, group, dim_v)
    eye = torch.eye(dim_v).expand(n_kv, group, dim_v, dim_v).clone()
    return {
        "zero": {PROJ_W: zero_w, PROJ_B: zero_b},
        "ones": {PROJ_W: zero_w, PROJ_B: torch.ones(n_kv, group, dim_v)},
        "identity": {PROJ_W: eye, PROJ_B: zero_b},
    }


def _run(method: SLA, q, k, v, layer: int, cal: dict | None) -> torch.Tensor:
    """SLA's output [B, H, T, Dv] float32 under ``cal`` (its PyTorch form, the fit's arithmetic)."""
    view = FeatureView("query", layer, q.shape[-1] ** -0.5, cal, None)
    return method.forward(q.float(), k.float(), v.float(), None, view)[0]


def pieces(method: SLA, q, k, v, layer: int):
    """(c, s, x): the critical part [B, H, T, Dv], the marginal share [B, H, T, 1] and ``s a``
    [B, H, T, Dv] of every row, from three calls of the method (float64)."""
    n_kv, dim_v = k.shape[1], v.shape[-1]
    maps = _maps(n_kv, q.shape[1] // n_kv, dim_v)
    crit = _run(method, q, k, v, layer, maps["zero"]).double()
    share = (_run(method, q, k, v, layer, maps["ones"]).double() - crit).mean(-1, keepdim=True)
    x = _run(method, q, k, v, layer, maps["identity"]).double() - crit
    return crit, share, x


def gram(method: SLA, q, k, v, layer: int):
    """The layer's sufficient statistics per query head: (Z^T Z [H, Dv+1, Dv+1], Z^T r
    [H, Dv+1, Dv]) with Z = [x, s] and r = y - c over every row of the batch, float64."""
    crit, share, x = pieces(method, q, k, v, layer)
    target = softmax_reference(q, k, v) - crit
    z = torch.cat([x, share], dim=-1).transpose(0, 1).flatten(1, 2)  # [H, B T, Dv + 1]
    r = target.transpose(0, 1).flatten(1, 2)  # [H, B T, Dv]
    return z.transpose(-1, -2) @ z, z.transpose(-1, -2) @ r


def solve(zz: torch.Tensor, zr: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ridge solution per query head towards the identity: (W [H, Dv, Dv], b [H, Dv]). One
    ``lam`` for the layer, ``ridge`` times the mean diagonal of all its heads' Gram matrices: a
    head whose marginal share is almost always zero has almost no data on its map, and a pull
    scaled by its own (tiny) Gram matrix would leave its map free to fit noise."""
    heads, n, dim_v = zr.shape
    lam = ridge * float(torch.diagonal(zz, dim1=-2, dim2=-1).mean().clamp(min=1e-12))
    prior = torch.cat([torch.eye(dim_v), torch.zeros(1, dim_v)]).double()  # [Dv + 1, Dv]
    system = zz + lam * torch.eye(n, dtype=zz.dtype)
    theta = torch.linalg.solve(system, zr + lam * prior)  # [H, Dv + 1, Dv]
    return theta[:, :dim_v].transpose(-1, -2), theta[:, dim_v]


def layer_errors(method: SLA, q, k, v, layer: int, *cals: dict | None) -> list[float]:
    """``|SLA - softmax|_F / |softmax|_F`` of the layer under each of ``cals`` (None:
    training-free), against one softmax reference."""
    ref = softmax_reference(q, k, v)
    outs = (_run(method, q, k, v, layer, cal).double() for cal in cals)
    return [float((out - ref).norm() / ref.norm()) for out in outs]


def fit(
    settings: SlaFitSettings,
    train: Callable[[int], dict],
    heldout: Callable[[int], dict],
    progress: Callable[[str], None] = lambda _: None,
) -> Calibration:
    """The calibration of ``settings.method()``: ``train(i)`` / ``heldout(i)`` give the captured
    ``{layer: (q, k, v)}`` of training / held-out window i. Its params record the settings and,
    per layer, the mean held-out error without and with the map."""
    method = settings.method()
    sums: dict[int, list[torch.Tensor]] = {}
    shape = None
    for i in range(settings.windows):
        captured = train(i)
        for layer, (q, k, v) in sorted(captured.items()):
            zz, zr = gram(method, q, k, v, layer)
            if layer in sums:
                sums[layer][0] += zz
                sums[layer][1] += zr
            else:
                sums[layer] = [zz, zr]
            shape = (k.shape[1], q.shape[1] // k.shape[1], v.shape[-1], k.shape[-1])
        progress(f"window {i + 1}/{settings.windows} fitted")
    assert shape is not None
    n_kv, group, dim_v, head_dim = shape
    layers = sorted(sums)
    w_all, b_all = [], []
    for layer in layers:
        w, b = solve(*sums[layer], settings.ridge)
        w_all.append(w.view(n_kv, group, dim_v, dim_v).float())
        b_all.append(b.view(n_kv, group, dim_v).float())
    tensors = {PROJ_W: torch.stack(w_all), PROJ_B: torch.stack(b_all)}
    plain = [0.0] * len(layers)
    fitted = [0.0] * len(layers)
    for i in range(settings.heldout):
        captured = heldout(i)
        for j, layer in enumerate(layers):
            q, k, v = captured[layer]
            cal = {PROJ_W: tensors[PROJ_W][j], PROJ_B: tensors[PROJ_B][j]}
            without, with_map = layer_errors(method, q, k, v, layer, None, cal)
            plain[j] += without / settings.heldout
            fitted[j] += with_map / settings.heldout
        progress(f"held-out window {i + 1}/{settings.heldout} measured")
    params = {
        **asdict(settings),
        "heldout_error_training_free": [round(e, 6) for e in plain],
        "heldout_error_fitted": [round(e, 6) for e in fitted],
    }
    return Calibration("sla", settings.model, len(layers), n_kv, head_dim, tensors, params)


def run(settings: SlaFitSettings, out, progress: bool = True):
    """Fit on the real model and write ``out``: (path, seconds, calibration)."""
    from longattn.eval import models
    from longattn.eval.tasks import disjoint_windows
    from longattn.integrations.hf import capture_qkv

    start = time.perf_counter()
    model, tokenizer = models.load(settings.model)
    corpus, length = settings.corpus, settings.length
    train_ids = disjoint_windows(tokenizer, corpus, length, settings.windows, seed=settings.seed)
    held_ids = disjoint_windows(tokenizer, corpus, length, settings.heldout, train_ids,
                                seed=HELDOUT_SEED + settings.seed)  # fmt: skip

    def captured(ids: list[int]) -> dict:
        return capture_qkv(model, torch.tensor([ids[:length]]))

    say = print if progress else (lambda _: None)
    cal = fit(settings, lambda i: captured(train_ids[i]), lambda i: captured(held_ids[i]), say)
    return cal.save(out), time.perf_counter() - start, cal
