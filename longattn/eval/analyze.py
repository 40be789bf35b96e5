"""Per-layer, per-head attention statistics of a real model on real text (``longattn analyze``).

For each head, over the queries in the last three quarters of the text: attention-sink mass (the first
``SINKS`` keys), locality (mass within ``window`` keys of the query), and the far mass (beyond the
window, not a sink) split into *vertical* (the ``TOP`` share of key columns with the most far mass),
*slash* (the ``TOP`` share of query-key offsets with the most far mass), *block* (keys in the query's
own ``BLOCK``-token block) and the rest, which is content-dependent: *retrieval-like* (this includes
diffuse heads that spread their far mass thinly; ``entropy_nats`` tells them apart). A head is
``local`` when sink + local mass reach ``LOCAL_SHARE`` (a Λ-shape: sink + window), else the largest
of the other four. These are the pattern families of MInference (arXiv:2407.02490) and of head-typing
methods such as DuoAttention (arXiv:2410.10819) and RazorAttention (arXiv:2407.15891); the thresholds
are ours.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import torch

from longattn.eval import tasks

SINKS = 4
TOP = 0.02
BLOCK = 128
LOCAL_SHARE = 0.7
CLASSES = ("local", "vertical", "slash", "block", "retrieval")
FILES = ("analysis.json", "head_classes.png", "head_stats.png", "attention_examples.png")


def head_probs(q: torch.Tensor, k: torch.Tensor, head: int) -> torch.Tensor:
    """Causal softmax of one head: q [1, H, T, D], k [1, Hkv, T, D] -> [T, T] float32."""
    groups = q.shape[1] // k.shape[1]
    qh, kh = q[0, head].float(), k[0, head // groups].float()
    scores = qh @ kh.T / qh.shape[-1] ** 0.5  # [T, T]
    t = scores.shape[0]
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def head_stats(probs: torch.Tensor, window: int) -> dict[str, float]:
    """Mass shares of one head's attention [T, T] (rows: the last three quarters of queries)."""
    t = probs.shape[0]
    q0 = t // 4
    p = probs[q0:]  # [Tq, T]
    q_pos = torch.arange(q0, t)[:, None]
    k_pos = torch.arange(t)[None, :]
    dist = q_pos - k_pos  # [Tq, T]
    sink = k_pos < SINKS
    local = (dist >= 0) & (dist < window) & ~sink
    far = (dist >= window) & ~sink
    p_far = p * far
    n_top = max(1, int(TOP * t))
    top_cols = p_far.sum(0).topk(n_top).indices
    offset_mass = torch.zeros(t).index_add_(0, dist.clamp_min(0).flatten(), p_far.flatten())
    top_offsets = offset_mass.topk(n_top).indices
    on_col = torch.zeros(t, dtype=torch.bool)
    on_col[top_cols] = True
    on_diag = torch.isin(dist, top_offsets)
    block = (q_pos // BLOCK == k_pos // BLOCK) & far
    vertical = (p_far * on_col[None, :]).sum(-1).mean()
    slash = (p_far * (on_diag & ~on_col[None, :])).sum(-1).mean()
    block_mass = (p_far * (block & ~on_diag & ~on_col[None, :])).sum(-1).mean()
    far_total = p_far.sum(-1).mean()
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    return {
        "sink": float((p * sink).sum(-1).mean()),
        "local": float((p * local).sum(-1).mean()),
        "vertical": float(vertical),
        "slash": float(slash),
        "block": float(block_mass),
        "retrieval": float((far_total - vertical - slash - block_mass).clamp_min(0)),
        "entropy_nats": float(entropy),
    }


def classify(stats: dict[str, float]) -> str:
    """``local`` for a sink + window head, else the largest far-mass pattern."""
    if stats["sink"] + stats["local"] >= LOCAL_SHARE:
        return "local"
    return max(("vertical", "slash", "block", "retrieval"), key=lambda c: stats[c])


def analyse_captured(captured: dict, window: int) -> list[dict]:
    """One entry per layer: its heads' statistics and classes."""
    layers = []
    for layer in sorted(captured):
        q, k, _ = captured[layer]
        heads = []
        for head in range(q.shape[1]):
            stats = head_stats(head_probs(q, k, head), window)
            heads.append({"head": head, **stats, "class": classify(stats)})
        layers.append({"layer": layer, "heads": heads})
    return layers


def run_analysis(
    model_name: str,
    length: int,
    out: pathlib.Path,
    corpus: str = "pydoc",
    force: bool = False,
    window: int = 64,
) -> pathlib.Path:
    """Capture a dense pass over ``length`` tokens of ``corpus``, analyse it, write JSON and PNGs."""
    from longattn.eval import text
    from longattn.eval.models import load
    from longattn.eval.runner import check_lengths
    from longattn.integrations.hf import capture_qkv

    if window <= 0:
        raise ValueError(f"--window must be > 0, got {window}")
    text.corpus(corpus)  # an unknown or missing corpus is refused before the model loads
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"analysis folder {out} exists: pass --force to overwrite")
    model, tokenizer = load(model_name)
    check_lengths([length], getattr(model.config, "max_position_embeddings", None))
    if out.exists():
        for name in FILES:
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / "maps", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    ids = torch.tensor([tasks.text_window(tokenizer, corpus, length, 0)])
    captured = capture_qkv(model, ids)
    layers = analyse_captured(captured, window)
    result = {
        "model": model_name, "length": length, "corpus": corpus, "window": window,
        "sinks": SINKS, "top_share": TOP, "block": BLOCK, "local_share": LOCAL_SHARE,
        "layers": layers,
    }  # fmt: skip
    path = out / "analysis.json"
    path.write_text(json.dumps(result, indent=1))
    from longattn.eval import analyze_plots

    analyze_plots.render(result, captured, out)
    return path
