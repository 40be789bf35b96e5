"""Fidelity of decode-time selection on captured activations: attention-mass recall and output error.

``decode_fidelity(captured, methods)`` replays the last ``steps`` tokens of a captured sequence as
decode steps through a ``KVCache`` (every layer, in order, so cross-layer methods such as TidalDecode
work as in generation). For each step, layer, method and query head it records

* recall: the fraction of the dense float64 softmax mass that falls on the keys the method attended;
* error:  ``|out - dense| / |dense|`` (L2 over the head dimension) of the method's output.

``longattn eval fidelity`` (``run_cli``) captures SmolLM2-135M on >= 4K tokens of real text.
"""

from __future__ import annotations

import argparse
import pathlib
import statistics

import torch

from longattn import KVCache, attention, from_string
from longattn.bench.common import ImplLog, JsonlWriter, cpu_line, environment, format_table
from longattn.method import Method


def _dense_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[H, T] float64 dense softmax of one query per head over k [Hkv, T, D]."""
    group = q.shape[0] // k.shape[0]
    scores = (q.double() @ k.double().repeat_interleave(group, 0).transpose(-1, -2)) * scale
    return torch.softmax(scores[:, 0], dim=-1)


def decode_fidelity(
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    methods: dict[str, Method],
    steps: int = 8,
) -> list[dict]:
    """Per (method, layer) mean recall and output error over the last ``steps`` positions."""
    layers = sorted(captured)
    q0, k0, _ = captured[layers[0]]
    total, dim = k0.shape[2], k0.shape[-1]
    scale = dim**-0.5
    records = []
    for label, method in methods.items():
        cache = KVCache(len(layers))
        for i, layer in enumerate(layers):
            _, k, v = captured[layer]
            cache.append(i, k[:1, :, : total - steps], v[:1, :, : total - steps])
        per_layer: dict[int, list[tuple[float, float]]] = {layer: [] for layer in layers}
        for t in range(total - steps, total):
            for i, layer in enumerate(layers):
                q, k, v = (x[:1] for x in captured[layer])
                sl = slice(t, t + 1)
                res = attention(
                    q[:, :, sl], k[:, :, sl], v[:, :, sl], method=method, cache=cache, layer=i
                )
                probs = _dense_probs(q[0, :, sl], k[0, :, : t + 1], scale)  # [H, t+1]
                values = v[0, :, : t + 1].double().repeat_interleave(q.shape[1] // k.shape[1], 0)
                dense = (probs.unsqueeze(1) @ values).squeeze(1)  # [H, 1, T] @ [H, T, D] -> [H, D]
                if res.state is None:
                    recall = torch.ones(q.shape[1], dtype=torch.float64)
                else:
                    chosen = res.state.to_mask(t + 1)[0]  # [Hkv, t+1] (the cache keeps every slot)
                    chosen = chosen.repeat_interleave(q.shape[1] // k.shape[1], 0)
                    recall = (probs * chosen).sum(-1)
                err = (res.out[0, :, 0].double() - dense).norm(dim=-1) / dense.norm(dim=-1)
                per_layer[layer].append((recall.mean().item(), err.mean().item()))
        for layer, vals in per_layer.items():
            records.append(
                {
                    "method": label,
                    "layer": layer,
                    "recall": statistics.mean(r for r, _ in vals),
                    "rel_error": statistics.mean(e for _, e in vals),
                }
            )
    return records


def summarize(records: list[dict]) -> list[dict]:
    """Mean over layers per method."""
    out = []
    for label in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == label]
        out.append(
            {
                "method": label,
                "recall": statistics.mean(r["recall"] for r in rows),
                "min_layer_recall": min(r["recall"] for r in rows),
                "rel_error": statistics.mean(r["rel_error"] for r in rows),
            }
        )
    return out


def real_text_ids(tokenizer, n_tokens: int, offset_chars: int = 0) -> torch.Tensor:
    """[1, n_tokens] token ids of stdlib pydoc topics text (offline, real English + code)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))[offset_chars:]
    ids = tokenizer(text[: n_tokens * 8], return_tensors="pt").input_ids[:, :n_tokens]
    if ids.shape[1] < n_tokens:
        raise ValueError(f"only {ids.shape[1]} tokens of text available, wanted {n_tokens}")
    return ids


def run_cli(args: argparse.Namespace) -> int:
    from longattn.calibration import calibrate_double_sparsity, calibrate_loki
    from longattn.eval.models import load
    from longattn.integrations.hf import capture_qkv

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    length = args.length or 4096
    frac = getattr(args, "fraction", None) or 0.125
    steps = getattr(args, "steps", None) or 8
    out = pathlib.Path(args.out or "results/fidelity.jsonl")
    model, tok = load("smollm2-135m")
    calib = capture_qkv(model, real_text_ids(tok, 1024, offset_chars=300_000))
    loki_path = calibrate_loki(calib, 16, "smollm2-135m").save(
        out.parent / "loki_smollm2.safetensors"
    )
    ds_path = calibrate_double_sparsity(calib, 16, "smollm2-135m").save(
        out.parent / "double_sparsity_smollm2.safetensors"
    )
    del calib
    captured = capture_qkv(model, real_text_ids(tok, length))
    methods = {
        "oracle_topk": from_string(f"oracle_topk:fraction={frac}"),
        "quest (first 2 layers dense, the default, as in the paper)": from_string(
            f"quest:fraction={frac}"
        ),
        "quest (every layer selected, dense_layers=0)": from_string(
            f"quest:fraction={frac},dense_layers=0"
        ),
        "loki (calibrated, r=16)": from_string(
            f"loki:fraction={frac},rank=16,calibration={loki_path}"
        ),
        "double_sparsity (calibrated, 16 ch)": from_string(
            f"double_sparsity:fraction={frac},channels=16,calibration={ds_path}"
        ),
        "infllm": from_string(f"infllm:fraction={frac}"),
        "tidal_decode": from_string(f"tidal_decode:fraction={frac}"),
    }
    with ImplLog() as ran:
        records = decode_fidelity(captured, methods, steps=steps)
    impls = ", ".join(ran.chosen) or None  # what dispatch chose for the decode steps
    writer = JsonlWriter(out)
    env = environment()
    for r in records:
        writer.write(dict(r, **env, tokens=length, fraction=frac, model="smollm2-135m", impl=impls))
    summary = summarize(records)
    print(
        f"SmolLM2-135M, {length} tokens of pydoc text, budget = {frac} of the context, "
        f"last {steps} positions as decode steps; CPU: {cpu_line()}"
    )
    print(
        format_table(
            summary,
            [
                ("method", "method"),
                ("recall", "mass recall"),
                ("min_layer_recall", "worst layer"),
                ("rel_error", "out rel err"),
            ],
        )
    )
    print(f"wrote {out}")
    return 0
