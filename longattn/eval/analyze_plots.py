"""PNGs of ``longattn analyze``: head classes, per-head mass shares, example attention maps."""

from __future__ import annotations

import pathlib

import torch

from longattn.eval.analyze import CLASSES, head_probs
from longattn.eval.plots import _plt, pooled_log10

CLASS_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")
EXAMPLE_SIZE = 512


def _grid(result: dict, key: str) -> torch.Tensor:
    """[layers, heads] tensor of one statistic."""
    return torch.tensor([[h[key] for h in layer["heads"]] for layer in result["layers"]])


def head_classes(result: dict, path: pathlib.Path) -> None:
    plt = _plt()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    index = torch.tensor(
        [[CLASSES.index(h["class"]) for h in layer["heads"]] for layer in result["layers"]]
    )
    fig, ax = plt.subplots(figsize=(5.5, 8))
    ax.imshow(
        index.numpy(),
        cmap=ListedColormap(CLASS_COLORS),
        vmin=-0.5,
        vmax=len(CLASSES) - 0.5,
        aspect="auto",
    )
    ax.set_xlabel("query head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(index.shape[1]))
    ax.set_title(f"Head pattern classes ({result['length']} tokens of {result['corpus']})")
    counts = {c: int((index == i).sum()) for i, c in enumerate(CLASSES)}
    handles = [
        Patch(color=CLASS_COLORS[i], label=f"{c} ({counts[c]})") for i, c in enumerate(CLASSES)
    ]
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def head_stats(result: dict, path: pathlib.Path) -> None:
    plt = _plt()
    keys = ("sink", "local", "vertical", "slash", "retrieval")
    titles = {
        "sink": f"sink mass (first {result['sinks']} keys)",
        "local": f"local mass (within {result['window']} keys)",
        "vertical": "vertical (top key columns)",
        "slash": "slash (top offsets)",
        "retrieval": "retrieval-like (rest of far mass)",
    }
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 6.5), layout="constrained")
    image = None
    for ax, key in zip(axes, keys):
        image = ax.imshow(
            100 * _grid(result, key).numpy(), vmin=0, vmax=100, cmap="viridis", aspect="auto"
        )
        ax.set_title(titles[key], fontsize=9)
        ax.set_xlabel("query head")
        ax.set_ylabel("layer")
    fig.colorbar(image, ax=axes, label="share of attention mass (%)", shrink=0.7)
    fig.suptitle(
        f"Where each head's attention goes ({result['length']} tokens of {result['corpus']})"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


def attention_examples(result: dict, captured: dict, path: pathlib.Path) -> None:
    """For each class, the map of the head most typical of it (highest score; first tokens)."""
    plt = _plt()
    picks = []
    for cls in CLASSES:
        # a retrieval-like head should be focused, not diffuse: rank by share per nat of entropy
        def typical(item, cls=cls):
            h = item[1]
            value = h[cls] / max(h["entropy_nats"], 1e-3) if cls == "retrieval" else h[cls]
            return (h["class"] == cls, value)

        best = max(
            ((layer["layer"], h) for layer in result["layers"] for h in layer["heads"]), key=typical
        )
        picks.append((cls, best[0], best[1]))
    fig, axes = plt.subplots(1, len(picks), figsize=(3.4 * len(picks), 3.8), layout="constrained")
    image = None
    for ax, (cls, layer, head) in zip(axes, picks):
        q, k, _ = captured[layer]
        size = min(EXAMPLE_SIZE, q.shape[2])
        probs = head_probs(q[:, :, :size], k[:, :, :size], head["head"])
        logp, extent = pooled_log10(probs)
        image = ax.imshow(logp, cmap="magma", vmin=-4, vmax=0, extent=extent)
        mark = "" if head["class"] == cls else " (no head of this class)"
        ax.set_title(f"{cls}: L{layer} H{head['head']}{mark}", fontsize=9)
        ax.set_xlabel("key position (token)")
        ax.set_ylabel("query position (token)")
    fig.colorbar(image, ax=axes, label="log10 attention probability", shrink=0.8)
    fig.suptitle("The most typical head of each class (dense attention, first tokens)")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(result: dict, captured: dict, out: pathlib.Path) -> list[pathlib.Path]:
    paths = [out / "head_classes.png", out / "head_stats.png", out / "attention_examples.png"]
    head_classes(result, paths[0])
    head_stats(result, paths[1])
    attention_examples(result, captured, paths[2])
    return paths
