"""Split SLA's marginal part (critical 0.1, 2048 tokens, layers 3, 12, 21 of SmolLM2-135M) into
its two estimates: the marginal keys' exp mass and their softmax-weighted average of v, each
swapped for the exact one (docs/runs/issue16/sla_error.md)."""

import math

import torch

from longattn.eval import models, tasks
from longattn.integrations.hf import capture_qkv
from longattn.methods import SLA
from longattn.methods.sla import CRITICAL, MARGINAL, _full_block_means, _grouped, features

torch.set_num_threads(1)
model, tok = models.load("smollm2-135m")
T = 2048
ids = torch.tensor([tasks.text_window(tok, "pydoc", T, 0)])
cap = capture_qkv(model, ids, [3, 12, 21])
m = SLA(critical=0.1, marginal=0.9, feature="elu", combine="mass")
for layer, (q, k, v) in cap.items():
    q, k, v = (t.double() for t in (q, k, v))
    scale = 64**-0.5
    classes = m.classify(q, k, 0, 0, (T - 1) // 64, scale)
    tk = classes.repeat_interleave(64, -1).repeat_interleave(64, -2)[..., :T, :T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    crit, marg = (tk == CRITICAL) & causal, (tk == MARGINAL) & causal
    s = scale * _grouped(q, k)
    sh = s.masked_fill(~causal, -math.inf).amax(-1, keepdim=True)
    e = torch.exp(s - sh).masked_fill(~causal, 0)
    vv = v.repeat_interleave(3, 1)
    ref = (e @ vv) / e.sum(-1, keepdim=True)
    ec, em = e * crit, e * marg
    Nc, Dc = ec @ vv, ec.sum(-1, keepdim=True)
    mass_true = em.sum(-1, keepdim=True)
    avg_true = (em @ vv) / mass_true.clamp(min=1e-300)
    kern = _grouped(features(q, "elu", scale), features(k, "elu", scale)).masked_fill(~marg, 0)
    avg_lin = (kern @ vv) / kern.sum(-1, keepdim=True).clamp(min=1e-300)
    lse = m._marginal_lse(q, k, tk, scale)
    mass_est = torch.exp(lse - sh)
    # block-pooled values average (pooled keys, block means of v)
    kb = _full_block_means(k, 64)
    vb = _full_block_means(v, 64)
    est = scale * _grouped(q, kb)
    cols = torch.arange(est.shape[-1]) * 64
    mb = (tk[..., cols] == MARGINAL) & (cols <= torch.arange(T)[:, None])
    w = torch.exp(est - sh).masked_fill(~mb, 0)
    avg_pool = (w @ vb.repeat_interleave(3, 1)) / w.sum(-1, keepdim=True).clamp(min=1e-300)

    def err(out, ref=ref):
        return float((out - ref).norm() / ref.norm())

    print(
        layer,
        "frac marg mass",
        float((mass_true / (mass_true + Dc)).mean()),
        "sparse",
        err(Nc / Dc),
        "est mass/true mass median",
        float((mass_est / mass_true.clamp(min=1e-300)).median()),
        "trueM+linavg",
        err((Nc + mass_true * avg_lin) / (Dc + mass_true)),
        "estM+trueavg",
        err((Nc + mass_est * avg_true) / (Dc + mass_est)),
        "estM+linavg",
        err((Nc + mass_est * avg_lin) / (Dc + mass_est)),
        "trueM+poolavg",
        err((Nc + mass_true * avg_pool) / (Dc + mass_true)),
        "mean-v avg",
        err(
            (Nc + mass_true * (marg.double() @ vv) / marg.sum(-1, keepdim=True).clamp(min=1))
            / (Dc + mass_true)
        ),
        flush=True,
    )
