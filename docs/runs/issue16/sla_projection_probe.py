"""Probe of SLA's "short fine-tune of the linear part": a per-head affine map of the marginal
part's values (v_hat -> W v_hat + b, what the paper's ``Proj`` on the linear output becomes for the
expansion form), fitted in closed form (ridge towards the identity, weight ``LAM`` x the mean
diagonal) to the model's softmax output on one 2,048-token window, evaluated on another.

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue16/sla_projection_probe.py LAM

Per layer and window (A: fitted on, B: held out): the relative error of training-free SLA
(critical 0.1, the rest marginal) and of the same with the fitted map. Output:
``sla_projection_probe.txt``.
"""

import math
import sys

import torch

from longattn.bench.linear_error import softmax_reference
from longattn.eval import models, tasks
from longattn.integrations.hf import capture_qkv
from longattn.methods import SLA
from longattn.methods import sla as S
from longattn.methods.sla_expansion import expand_blocks, expansion_points

LAYERS = [3, 9, 15, 21, 27]


def block_parts(m, q, k, v, i, classes, points, scale):
    """One query block's rows: the critical part over the full denominator, the marginal share
    of the denominator and the marginal part's own average (the PyTorch form's pieces)."""
    batch, _, length, dim = q.shape
    n_kv, bs = k.shape[1], m.block_size
    lo, hi = i * bs, min(length, (i + 1) * bs)
    rows = q[:, :, lo:hi].float().reshape(batch, n_kv, -1, hi - lo, dim)
    cls = classes[:, :, i].view(batch, n_kv, -1, classes.shape[-1])
    keys, vals = k[:, :, :hi].float(), v[:, :, :hi].float()
    k_c, v_c, tok = S._critical_keys(keys, vals, cls, bs)
    scores = scale * (rows @ k_c.transpose(-1, -2))
    crit = (tok[..., None, :] <= torch.arange(lo, hi)[:, None]) & (tok[..., None, :] < hi)
    top = scores.masked_fill(~crit, -math.inf).amax(-1, keepdim=True)
    marg = (cls == S.MARGINAL).float()
    mass, lin_sum = torch.zeros_like(top), None
    if lo // bs and bool(marg[..., : lo // bs].any()):
        pts = points[:, :, i].view(batch, n_kv, -1, m.n_points, dim)
        mu, v_hat = expand_blocks(rows, pts, keys, vals, bs, lo // bs, scale)
        off = (marg[..., : lo // bs] == 0).repeat(1, 1, 1, m.n_points)
        mu = mu.masked_fill(off[..., None, :], -math.inf)
        top = torch.maximum(top, mu.amax(-1, keepdim=True))
        lin = torch.exp(mu - top).nan_to_num(0.0)
        lin_sum, mass = lin @ v_hat, lin.sum(-1, keepdim=True)
    weights = torch.exp(scores - top).masked_fill(~crit, 0.0)
    den = weights.sum(-1, keepdim=True) + mass
    crit_part = (weights @ v_c) / den
    average = torch.zeros_like(crit_part)
    if lin_sum is not None:
        average = torch.where(mass > 0, lin_sum / mass.clamp(min=1e-30), 0.0)
    return crit_part, mass / den, average


def parts(m, q, k, v, scale):
    batch, n_heads, length, dim = q.shape
    last = (length - 1) // m.block_size
    classes = m.classify(q, k, 0, 0, last, scale)
    points = expansion_points(q, 0, 0, last, m.block_size, m.n_points)
    pieces = [block_parts(m, q, k, v, i, classes, points, scale) for i in range(last + 1)]
    return [
        torch.cat([p[n].reshape(batch, n_heads, -1, p[n].shape[-1]) for p in pieces], 2)
        for n in range(3)
    ]


def fit(crit, share, average, target, lam):
    """Per head, W [D + 1, D] minimising |crit + share (W [average, 1]) - target|^2 + ridge."""
    maps = []
    for h in range(crit.shape[1]):
        x = torch.cat([share[0, h] * average[0, h], share[0, h]], -1).double()
        r = (target[0, h] - crit[0, h]).double()
        eye = torch.cat([torch.eye(average.shape[-1]), torch.zeros(1, average.shape[-1])])
        ridge = lam * x.pow(2).sum(0).mean()
        gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.double)
        maps.append(torch.linalg.solve(gram, x.T @ r + ridge * eye.double()))
    return maps


def main(lam: float) -> None:
    torch.set_num_threads(1)
    model, tokenizer = models.load("smollm2-135m")
    windows = {
        name: capture_qkv(model, torch.tensor([tasks.text_window(tokenizer, "pydoc", 2048, s)]),
                          LAYERS)
        for name, s in (("A", 0), ("B", 7))
    }  # fmt: skip
    method = SLA(critical=0.1, marginal=0.9)
    for layer in LAYERS:
        res = {}
        for name, captured in windows.items():
            q, k, v = captured[layer]
            target = softmax_reference(q, k, v).float()
            res[name] = (*parts(method, q, k, v, q.shape[-1] ** -0.5), target)
        maps = fit(*res["A"], lam)
        for name, (crit, share, average, target) in res.items():
            ones = torch.ones_like(average[..., :1])
            mapped = torch.stack(
                [(torch.cat([average[0, h], ones[0, h]], -1).double() @ maps[h]).float()
                 for h in range(len(maps))]
            )[None]  # fmt: skip
            plain = (crit + share * average - target).norm() / target.norm()
            fitted = (crit + share * mapped - target).norm() / target.norm()
            print(f"{lam} {layer} {name} plain {plain:.4f} fitted {fitted:.4f} "
                  f"ratio {fitted / plain:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else 1e-3)
