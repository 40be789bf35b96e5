"""ThinK's channel choice on SmolLM2-135M's own q/k/v: attention output error of later queries over
keys pruned to the channels ThinK keeps, against other choices of as many channels.

One 2K window of pydoc text (the eval's ppl text, sample 0); per layer, the prompt is the first
``T - tail`` tokens: channels are chosen from its last ``window`` queries and its keys (ThinK's rule,
``ThinK.key_channels``), then the ``tail`` later queries attend causally over all T keys with the
key channels pruned (scale 1/sqrt(D)) and every value channel. Error: ||out - out_full|| /
||out_full|| over the tail queries, mean over layers. Choices: ThinK, key norm only
(``||K[:, c]||``), random channels (seeded, per KV head), and ThinK's worst channels.

    PYTHONPATH=. OMP_NUM_THREADS=1 python docs/runs/issue13/think_channels.py
"""

from __future__ import annotations

import math

import torch

from longattn.eval import models, tasks
from longattn.integrations.hf import capture_qkv
from longattn.kernels.reference import reference_attention
from longattn.methods import ThinK
from longattn.testing import kept_channel_queries, score_view

LENGTH, TAIL, WINDOW = 2048, 256, 32


def pruned_error(q, k, v, channels, start):
    """Relative output error of queries ``start:`` over keys restricted to ``channels``."""
    t = k.shape[2]
    causal = torch.arange(t).view(1, -1) <= torch.arange(start, t).view(-1, 1)
    qt = q[:, :, start:].double()
    full = reference_attention(qt, k.double(), v.double(), causal, q.shape[-1] ** -0.5).out
    kept = kept_channel_queries(qt, channels)
    out = reference_attention(kept, k.double(), v.double(), causal, q.shape[-1] ** -0.5).out
    return float((out - full).norm() / full.norm())


def choices(q, k, keep, start, gen):
    """name -> [B, Hkv, n] channels chosen from the prompt (positions < start)."""
    batch, n_kv, _, dim = k.shape
    n = math.floor(keep * dim + 1e-9)
    prompt_k = k[:, :, :start]
    view = score_view(prompt_k, prompt_k, torch.arange(start).expand(batch, start),
                      q[:, :, start - WINDOW : start], torch.arange(start - WINDOW, start),
                      dim**-0.5)  # fmt: skip
    think = ThinK(keep=keep, window=WINDOW).key_channels(view)
    qn = q[:, :, start - WINDOW : start].double().reshape(batch, n_kv, -1, dim).norm(dim=2)
    score = qn * prompt_k.double().norm(dim=2)  # [B, Hkv, D]
    knorm = prompt_k.double().norm(dim=2).topk(n, dim=-1).indices.sort(-1).values
    worst = (-score).topk(n, dim=-1).indices.sort(-1).values
    rand = torch.stack([torch.randperm(dim, generator=gen)[:n] for _ in range(batch * n_kv)])
    rand = rand.view(batch, n_kv, n).sort(-1).values
    return {"think": think, "key norm": knorm, "random": rand, "think worst": worst}


def main() -> None:
    torch.set_num_threads(1)
    model, tokenizer = models.load("smollm2-135m")
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", LENGTH, 0)])
    captured = capture_qkv(model, ids)
    start = LENGTH - TAIL
    print(f"SmolLM2-135M, pydoc {LENGTH} tokens, tail {TAIL} queries, window {WINDOW}")
    print("| keep | channels kept | " + " | ".join(["think", "key norm", "random", "think worst"])
          + " |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for keep in (0.5, 0.6, 0.75, 0.9):
        gen = torch.Generator().manual_seed(0)
        errors: dict[str, list[float]] = {}
        for layer in sorted(captured):
            q, k, v = captured[layer]
            for name, channels in choices(q, k, keep, start, gen).items():
                errors.setdefault(name, []).append(pruned_error(q, k, v, channels, start))
        kept = math.floor(keep * k.shape[-1] + 1e-9)
        means = [sum(e) / len(e) for e in errors.values()]
        print(f"| {keep} | {kept} of {k.shape[-1]} | " + " | ".join(f"{m:.3f}" for m in means)
              + " |")  # fmt: skip


if __name__ == "__main__":
    main()
