"""Why Scatterbrain's low-rank part carries no information on SmolLM2's q/k, and whether a
random-feature map of lower variance changes that.

A positive random feature's estimate of ``exp(x . y)`` (x, y the query and key scaled by
``scale ** 0.5``) has relative variance ``exp(s) - 1`` per feature for FAVOR+ (Performer), with
``s = |x + y|^2``. The generalised exponential features of Likhosherstov et al. 2022
(arXiv:2205.15317; ``phi(x) = D exp(A |w|^2 + B w . x - |x|^2 / 2)``, ``B^2 = 1 - 4A``,
``D = (1 - 4A)^(d/4)``, still unbiased) trade that for
``d [log(1 + u/2) - log(1 + u) / 2] + s / (1 + u)`` in the exponent (``u = -8A >= 0``; u = 0 is
FAVOR+). Per layer of SmolLM2-135M on 2,048 tokens of pydoc text (float64, 128 orthogonal
features, draw 0 of the layer), this prints: the median and 90th percentile of s over the causal
pairs, the smallest exponent any u reaches at the median s, and for u in a grid the error
``|out - softmax|_F / |softmax|_F`` of the features alone and of Scatterbrain on the top-2 blocks
of 64 support (as ``bench hybrid-error``'s row ``n_features=128, sparse=topk_blocks, n_blocks=2``;
u = 0 is that row's method), next to the sparse part alone.

    PYTHONPATH=. OMP_NUM_THREADS=1 python docs/runs/issue16/scatterbrain_feature_variance.py
"""

import math

import torch

from longattn.bench.common import cpu_line
from longattn.eval import models, tasks
from longattn.integrations.hf import capture_qkv
from longattn.methods.performer import orthogonal_features
from longattn.methods.scatterbrain import grouped, top_blocks

LAYERS = [2, 10, 18, 26]
FEATURES, BLOCK, N_BLOCKS = 128, 64, 2
US = [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def smallest_exponent(s: float, dim: int) -> float:
    """min over u >= 0 of the per-feature log relative second moment at s (grid search)."""
    grid = [i / 100 for i in range(0, 5001)]
    return min(dim * (math.log1p(u / 2) - 0.5 * math.log1p(u)) + s / (1 + u) for u in grid)


def layer_row(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    q, k, v = (t.double() for t in (q, k, v))
    length, dim, n_kv = q.shape[2], q.shape[-1], k.shape[1]
    root = dim**-0.25  # scale ** 0.5 with scale = dim ** -0.5
    xq, xk, vv = grouped(q, n_kv) * root, (k * root).unsqueeze(2), v.unsqueeze(2)
    scores = xq @ xk.transpose(-1, -2)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    support = top_blocks(q, k, 0, BLOCK, N_BLOCKS) & causal

    def out_of(weights):
        return (weights @ vv) / weights.sum(-1, keepdim=True)

    full = scores.masked_fill(~causal, -torch.inf)
    ref = out_of(torch.exp(full - full.amax(-1, keepdim=True)))
    on = scores.masked_fill(~support, -torch.inf)
    sparse = out_of(torch.exp(on - on.amax(-1, keepdim=True)))
    s = (xq.pow(2).sum(-1)[..., :, None] + xk.pow(2).sum(-1)[..., None, :] + 2 * scores)[
        ..., causal
    ].flatten()
    sample = s[:: max(1, s.numel() // 1_000_000)]
    s_med, s_p90 = float(sample.median()), float(sample.quantile(0.9))
    cells = [f"{layer}", f"{s_med:.1f}", f"{s_p90:.1f}", f"{smallest_exponent(s_med, dim):.1f}",
             f"{rel(sparse, ref):.3f}"]  # fmt: skip
    w = orthogonal_features(0, layer, 0, dim, FEATURES)
    w2 = w.pow(2).sum(-1)
    for u in US:
        a = -u / 8
        b, log_d = math.sqrt(1 - 4 * a), dim / 4 * math.log(1 - 4 * a)
        lq = log_d + a * w2 + b * (xq @ w.T) - 0.5 * xq.pow(2).sum(-1, keepdim=True)
        lk = a * w2 + b * (xk @ w.T) - 0.5 * xk.pow(2).sum(-1, keepdim=True)
        mq, mk = lq.amax(-1, keepdim=True), lk.amax((-1, -2), keepdim=True)
        low = (torch.exp(lq - mq) @ torch.exp(lk - mk).transpose(-1, -2)) / FEATURES
        low_log = mq + mk.transpose(-1, -2)  # low * exp(low_log) estimates exp(x . y)
        alone = out_of(low.masked_fill(~causal, 0.0))
        top = torch.maximum(on.amax(-1, keepdim=True), low_log)
        mixed = torch.where(support, torch.exp(on - top),
                            (low * torch.exp(low_log - top)).masked_fill(~causal, 0.0))  # fmt: skip
        hybrid = out_of(mixed)
        cells.append(f"{rel(alone, ref):.3f} / {rel(hybrid, ref):.3f}")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    model, tokenizer = models.load("smollm2-135m")
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", 2048, 0)])
    captured = capture_qkv(model, ids, layers=LAYERS)
    print(f"CPU: {cpu_line()}")
    print(f"F = {FEATURES}, support: own block + top-{N_BLOCKS} blocks of {BLOCK}; "
          "cells per u: features alone / Scatterbrain")  # fmt: skip
    head = ["layer", "s median", "s p90", "min exponent at median s", "sparse alone"]
    print("| " + " | ".join(head + [f"u={u:g}" for u in US]) + " |")
    print("|---" * (len(head) + len(US)) + "|")
    for layer, (q, k, v) in captured.items():
        print(layer_row(layer, q, k, v), flush=True)


if __name__ == "__main__":
    main()
