"""Where SLA's expansion form leaves its error: sparse-only against the expansion (one point, the
previous query block's mean query) and against each of its two estimates replaced by the truth,
per marginal block: the mass (``expMass+trueAvg`` keeps the expansion's mass and the exact
softmax average of the block's values; ``trueMass+expAvg`` the reverse); ``restMass%`` the share
of the softmax mass in the non-critical blocks; ``estMass/true`` the median ratio of estimated to
exact non-critical mass. Float64, every head, SmolLM2 q/k/v at 4,096 tokens of pydoc text, the
classification of ``SLA(critical=0.05)`` (pooled previous-block query, sink and diagonal kept).

    PYTHONPATH=. OMP_NUM_THREADS=2 python docs/runs/issue16/sla_expansion_decompose.py
"""

import math

import torch

from longattn.eval import models, tasks
from longattn.integrations.hf import capture_qkv

torch.set_default_dtype(torch.float64)
CRIT = 0.05
BS = 64


def run(q, k, v, crit):
    T, D = q.shape
    nb = T // BS
    s = q @ k.T
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    s = s.masked_fill(~causal, -torch.inf)
    ref = torch.softmax(s, -1) @ v
    qb = torch.arange(T) // BS
    kb = k.view(nb, BS, D)
    vb = v.view(nb, BS, -1)
    Qb = q.view(nb, BS, D)
    mu = kb.mean(1)
    qbar = Qb.mean(1)
    qprev = torch.cat([qbar[:1], qbar[:-1]])
    earlier = torch.arange(nb)[None, :] < torch.arange(nb)[:, None]
    sc = (qprev @ mu.T).masked_fill(~earlier, -torch.inf)
    sc[:, 0] = torch.where(earlier[:, 0], torch.inf, sc[:, 0])
    order = sc.argsort(-1, descending=True)
    sel = torch.zeros(nb, nb, dtype=torch.bool)
    for i in range(1, nb):
        c = max(1, math.ceil(crit * (i + 1) - 1e-9)) - 1
        c = max(c, 1)
        sel[i, order[i, :c]] = True
    sel &= earlier
    exact_mask = (sel | torch.eye(nb, dtype=torch.bool))[qb][:, qb] & causal
    m = s.masked_fill(~exact_mask, -torch.inf).amax(-1, keepdim=True)
    w = torch.exp(s.masked_fill(~exact_mask, -torch.inf) - m)
    Ne = w @ v
    Ze = w.sum(-1, keepdim=True)
    rest = (earlier & ~sel)[qb]
    # exact per-block mass and avg
    E = torch.exp(s - m).masked_fill(~causal, 0)[:, : nb * BS].view(T, nb, BS)
    Zt = E.sum(-1)
    At = torch.einsum("tbj,bjv->tbv", E, vb) / Zt[..., None].clamp(min=1e-300)
    anc = qprev[qb]
    lw = torch.einsum("id,bjd->ibj", qprev, kb)
    lmax = lw.amax(-1, keepdim=True)
    W = torch.exp(lw - lmax)
    Zw = W.sum(-1)
    P = W / Zw[..., None]
    khat = torch.einsum("ibj,bjd->ibd", P, kb)[qb]
    vhat = torch.einsum("ibj,bjv->ibv", P, vb)[qb]
    Ze_ = torch.exp(
        torch.log(Zw)[qb] + lmax[..., 0][qb] + torch.einsum("td,tbd->tb", q - anc, khat) - m
    )

    def comb(Z, A):
        Z = Z.masked_fill(~rest, 0)
        return (Ne + (Z[..., None] * A).sum(1)) / (Ze + Z.sum(-1, keepdim=True))

    res = {
        "sparse": Ne / Ze,
        "exp": comb(Ze_, vhat),
        "expMass+trueAvg": comb(Ze_, At),
        "trueMass+expAvg": comb(Zt, vhat),
        "restMass%": None,
    }
    out = {k_: float((o - ref).norm() / ref.norm()) for k_, o in res.items() if o is not None}
    tot = Ze[:, 0] + Zt.masked_fill(~rest, 0).sum(-1)
    out["restMass%"] = float((Zt.masked_fill(~rest, 0).sum(-1) / tot).mean())
    out["estMass/true"] = float(
        (Ze_.masked_fill(~rest, 0).sum(-1) / Zt.masked_fill(~rest, 0).sum(-1).clamp(min=1e-300))[
            T // 4 :
        ].median()
    )
    return out


def main():
    tot = {}
    for L, (q, k, v) in cap.items():
        q, k, v = (t.double() for t in (q, k, v))
        G = q.shape[1] // k.shape[1]
        D = q.shape[-1]
        acc = {}
        for h in range(q.shape[1]):
            r = run(q[0, h] * D**-0.5, k[0, h // G], v[0, h // G], CRIT)
            for a, b in r.items():
                acc[a] = acc.get(a, 0) + b / q.shape[1]
        for a, b in acc.items():
            tot[a] = tot.get(a, 0) + b / len(cap)
        print(L, " ".join(f"{a}:{b:.3f}" for a, b in acc.items()), flush=True)
    print("MEAN", " ".join(f"{a}:{b:.3f}" for a, b in tot.items()))


if __name__ == "__main__":
    model, tokenizer = models.load("smollm2-135m")
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", 4096, 0)])
    cap = capture_qkv(model, ids, layers=[0, 3, 6, 9, 12, 15, 18, 21, 24, 27])
    main()
