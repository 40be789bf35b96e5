"""Probe behind docs/runs/issue15/distill.md, "the window's scale": the same per-layer training under
the engine's windowed form (exact terms exp(s), linear terms phi.phi, one normaliser) and under
LoLCATs' form (exact terms exp(s - m_t) with m_t the row's largest window score, so the linear
terms compete with weights <= 1), on a few layers of SmolLM2-135M. Held-out output MSE relative to
the target's mean square (1.0 = as bad as outputting zeros).

    OMP_NUM_THREADS=1 PYTHONPATH=. python docs/runs/issue15/distill_form_probe.py 100 0.01 5,15,25 \
        engine,lolcats,engine+sink

The LoLCATs form is obtained from the training form by dropping the linear terms' exp(-shift)
(``Window.exact``'s shift set to 0); "engine+sink" keeps the first token exact besides the
window. No library path runs either today.
"""

import dataclasses
import sys
import time

import torch

from longattn.eval import distill as D
from longattn.eval.models import load


def lolcats(part: D.Window) -> D.Window:
    num, shift = part.exact
    return dataclasses.replace(part, exact=(num, torch.zeros_like(shift)))


@torch.no_grad()
def with_sink(part: D.Window, scale: float, window: int) -> D.Window:
    """The engine's form with the first token as an exact sink (StreamingLLM): key 0 leaves the
    linear part (its value row and ones column zeroed) and joins every row's exact terms."""
    num, shift = part.exact
    batch, n_kv, rows, width = num.shape
    group, n_keys = part.q.shape[1] // n_kv, part.q.shape[2]
    q = part.q.reshape(batch, n_kv, group * n_keys, -1)  # rows ordered (member, position)
    score = (q @ part.k[:, :, :1].transpose(-1, -2)) * scale  # [B, Hkv, G*T, 1]
    sink = torch.exp(score - shift) * part.values[:, :, :1]  # [B, Hkv, G*T, Dv + 1]
    old = (torch.arange(n_keys) >= window).repeat(group)[None, None, :, None]
    values = part.values.clone()
    values[:, :, 0] = 0
    return dataclasses.replace(part, values=values, exact=(num + sink * old, shift))


def main() -> None:
    torch.set_num_threads(2)
    model, tokenizer = load("smollm2-135m")
    settings = D.DistillSettings(windows=4, steps=int(sys.argv[1]), lr=float(sys.argv[2]))
    layers = [int(x) for x in sys.argv[3].split(",")]
    train, held = D._layer_data(model, tokenizer, settings, layers)
    scales = D.attention_scales(model)
    for layer in layers:
        scale = scales[layer]
        parts = [D.Window.prepare(*x, scale, settings.window) for x in train[layer]]
        checks = [D.Window.prepare(*x, scale, settings.window) for x in held[layer]]
        forms = {"engine": lambda w: w, "lolcats": lolcats,
                 "engine+sink": lambda w, s=scale: with_sink(w, s, settings.window)}  # fmt: skip
        for form in sys.argv[4].split(",") if len(sys.argv) > 4 else forms:
            f = forms[form]
            start = time.perf_counter()
            wq, wk = D.train_layer([f(w) for w in parts], settings, layer, scale)
            err = D.layer_errors([f(w) for w in checks], wq, wk, layer, scale, settings.window)
            rel = {k: round(v / err["power"], 4) for k, v in err.items() if k != "power"}
            print(layer, form, f"{time.perf_counter() - start:.0f}s", rel, flush=True)


if __name__ == "__main__":
    main()
