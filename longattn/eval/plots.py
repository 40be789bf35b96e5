"""PNG plots of an eval folder (matplotlib, Agg backend); ``longattn plot`` re-renders them."""

from __future__ import annotations

import math
import pathlib

import torch

from longattn.eval import metrics, report, tasks
from longattn.eval.runner import BASELINE
from longattn.method import from_string

PLOTS_DIR = "plots"
MAX_OVERLAY_METHODS = 3


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(methods: list[str]) -> dict[str, str]:
    cycle = ["#222222", "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    return {m: cycle[i % len(cycle)] for i, m in enumerate(methods)}


def pooled_log10(probs: torch.Tensor, target: int = 256) -> tuple:
    """log10 of a [T, T] attention map max-pooled to about ``target`` pixels a side, and its extent.

    Drawing a 512-token map in a 220-pixel panel drops single-token lines at random (aliasing); the
    max keeps every strong key column or diagonal visible.
    """
    size = probs.shape[-1]
    step = max(1, -(-size // target))
    pooled = torch.nn.functional.max_pool2d(probs[None, None], step, ceil_mode=True)[0, 0]
    extent = (-0.5, size - 0.5, size - 0.5, -0.5)
    return pooled.clamp_min(1e-4).log10().numpy(), extent


def _empty(ax, text: str) -> None:
    ax.text(
        0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="gray", wrap=True
    )


def accuracy_vs_budget(records: list[dict], path: pathlib.Path) -> None:
    """Accuracy (and fidelity mass recall) against density, one panel per task."""
    plt = _plt()
    panels = [t for t in tasks.TASKS if any(r["task"] == t for r in records)]
    if any(r["task"] == "fidelity" for r in records):
        panels.append("fidelity")
    panels = panels or ["(no task)"]
    methods = list(dict.fromkeys(r["method"] for r in records))
    colors = _colors(methods)
    lengths = sorted({r["length"] for r in records})
    markers = dict(zip(lengths, "osD^v<>p*"))
    # methods at the same density and accuracy would hide each other: shift each a little sideways
    jitter = {m: 1.5 * (i - (len(methods) - 1) / 2) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    for ax, task in zip(axes[0], panels):
        key = "recall_mean" if task == "fidelity" else "score"
        shown = report.measured_fidelity(records) if task == "fidelity" else records
        for method in methods:
            for length in lengths:
                rs = [
                    r for r in shown
                    if r["method"] == method and r["task"] == task and r["length"] == length
                    and not r.get("error") and r.get(key) is not None
                ]  # fmt: skip
                if rs:
                    y = 100 * sum(r[key] for r in rs) / len(rs)
                    x = 100 * rs[0]["density"] + jitter[method]
                    ax.scatter(x, y, color=colors[method], marker=markers[length], s=60,
                               alpha=0.85, edgecolors="white", linewidths=0.5)  # fmt: skip
        ax.set_title(
            "fidelity: attention mass recall" if task == "fidelity" else f"{task} accuracy"
        )
        ax.set_xlabel("density (% of causal pairs; of KV kept or read per decode step)")
        ax.set_ylabel("mass recall (%)" if task == "fidelity" else "accuracy (%)")
        ax.set_xlim(0, 105)
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    handles = _legend_handles(plt, methods, colors, lengths, markers)
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.suptitle(
        "Accuracy vs budget (each point: mean over samples; methods shifted ±few % to stay visible)"
    )
    fig.tight_layout(rect=(0, 0.1 + 0.03 * (len(handles) // 7), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _legend_handles(plt, methods, colors, lengths, markers) -> list:
    """Colour = method, marker = length."""
    line = plt.Line2D
    handles = [
        line([], [], color=colors[m], marker="o", ls="", label=report.short_label(m))
        for m in methods
    ]
    return handles + [
        line([], [], color="gray", marker=markers[n], ls="", label=f"{n} tokens") for n in lengths
    ]


def speedup_vs_length(records: list[dict], path: pathlib.Path) -> None:
    """Prefill speedup over the baseline against sequence length, one line per method."""
    plt = _plt()
    speed = report.speedups([r for r in records if not r.get("error")])
    methods = [m for m in dict.fromkeys(r["method"] for r in records) if m != BASELINE]
    colors = _colors([BASELINE] + methods)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    drawn = False
    for method in methods:
        points = sorted((n, s) for (m, n), s in speed.items() if m == method)
        if points:
            ax.plot(
                *zip(*points), marker="o", color=colors[method], label=report.short_label(method)
            )
            drawn = True
    ax.axhline(1.0, color="black", ls="--", lw=1, label=f"{BASELINE} (= 1)")
    if not drawn:
        _empty(ax, "no timed method cases (see the report's 'Cases not run')")
    ax.set_xscale("log", base=2)
    lengths = sorted({n for _, n in speed})
    if lengths:
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(f"prefill speedup vs {BASELINE} (×)")
    ax.set_title("Realised prefill speedup vs length")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def needle_heatmap(records: list[dict], path: pathlib.Path) -> None:
    """Needle accuracy by depth × length, one panel per method."""
    plt = _plt()
    grid = report.needle_grid(records)
    methods = [m for m in dict.fromkeys(r["method"] for r in records) if m in grid] or ["(none)"]
    depths = sorted({d for g in grid.values() for d, _ in g})
    lengths = sorted({n for g in grid.values() for _, n in g})
    cols = min(4, len(methods))
    rows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(3.6 * cols, 3.4 * rows), squeeze=False, layout="constrained"
    )
    image = None
    for ax, method in zip(axes.flat, methods):
        cells = grid.get(method, {})
        data = torch.full((len(depths), len(lengths)), float("nan"))
        for (d, n), v in cells.items():
            data[depths.index(d), lengths.index(n)] = 100 * v
        image = ax.imshow(data.numpy(), vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(data[i, j]):
                    ax.text(j, i, f"{data[i, j]:.0f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{100 * d:.0f}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        if ax in axes[:, 0]:
            ax.set_ylabel("needle depth (% of context)")
        ax.set_title(
            report.short_label(method) if method != "(none)" else "no needle cases", fontsize=9
        )
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes, label="accuracy (%)", shrink=0.8)
    fig.suptitle("Needle in a haystack: accuracy by depth and length")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def attention_maps(records: list[dict], maps_path: pathlib.Path, path: pathlib.Path) -> bool:
    """Dense attention of selected heads (log scale), with each method's visible set outlined."""
    if not maps_path.exists():
        return False
    plt = _plt()
    saved = torch.load(maps_path)
    maps, size = saved["maps"], saved["size"]
    methods = [
        m for m in dict.fromkeys(r["method"] for r in records)
        if m != BASELINE and from_string(m).hook == "mask" and from_string(m).name != "dense"
    ][:MAX_OVERLAY_METHODS]  # fmt: skip
    cols = ["dense"] + methods
    fig, axes = plt.subplots(
        len(maps), len(cols), figsize=(3.3 * len(cols), 3.1 * len(maps)), squeeze=False,
        layout="constrained",
    )  # fmt: skip
    pos = torch.arange(size)
    image = None
    for i, (name, probs) in enumerate(maps.items()):
        layer, head = (int(x) for x in name.split("."))
        logp, extent = pooled_log10(probs)
        for j, method in enumerate(cols):
            ax = axes[i, j]
            image = ax.imshow(logp, cmap="magma", vmin=-4, vmax=0, extent=extent)
            if method != "dense":
                seen = metrics.visible(from_string(method), head + 1, pos, pos)[head]
                ax.contour(seen.float().numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
                hidden = (~seen) & (pos[None, :] <= pos[:, None])
                white = torch.ones(size, size, 4)
                white[..., 3] = 0.6 * hidden.float()  # wash out the causal keys the method drops
                ax.imshow(white.numpy(), extent=extent)
            ax.set_title(
                f"L{layer} H{head}"
                + ("" if method == "dense" else f" · {report.short_label(method)}"),
                fontsize=8,
            )
            ax.set_xlabel("key position (token)", fontsize=8)
            ax.set_ylabel("query position (token)", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle(
        f"Attention maps on {saved.get('corpus', 'real')} text (first {size} tokens)\n"
        "cyan outline: the method's visible keys; washed out: causal keys it drops"
    )
    if image is not None:
        fig.colorbar(image, ax=axes, label="log10 attention probability", shrink=0.6)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return True


def fidelity_by_layer(records: list[dict], path: pathlib.Path) -> bool:
    """Per-layer output error and mass recall of each method on captured activations (a select
    method's over decode steps, where it acts)."""
    rows = report.measured_fidelity(records)
    if not rows:
        return False
    plt = _plt()
    longest = max(r["length"] for r in rows)
    rows = [r for r in rows if r["length"] == longest]
    colors = _colors([BASELINE] + [r["method"] for r in rows])
    fig, (ax_err, ax_rec) = plt.subplots(1, 2, figsize=(11, 4))
    exact = [report.short_label(r["method"]) for r in rows if not any(r["layer_error"])]
    for r in rows:
        layers = range(len(r["layer_error"]))
        err = [e if e is not None else float("nan") for e in r["layer_error"]]
        rec = [100 * x if x is not None else float("nan") for x in r["mass_recall"]]
        label = report.short_label(r["method"])
        if any(r["layer_error"]):  # an exact method (error 0) has no point on a log axis
            ax_err.plot(layers, err, marker=".", color=colors[r["method"]], label=label)
        ax_rec.plot(layers, rec, marker=".", color=colors[r["method"]], label=label)
    ax_err.set_yscale("log")
    note = f"; error 0: {', '.join(exact)}" if exact else ""
    ax_err.set_title(f"Attention output error vs dense ({longest} tokens{note})", fontsize=10)
    ax_err.set_ylabel("relative L2 error of the layer's output")
    ax_rec.set_title(
        f"Dense attention mass kept ({longest} tokens; static patterns: last 256 prefill queries, "
        "select methods: decode steps)",
        fontsize=9,
    )
    ax_rec.set_ylabel("mass recall (%)")
    ax_rec.set_ylim(0, 105)
    for ax in (ax_err, ax_rec):
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def render(folder: pathlib.Path) -> list[str]:
    """Write every plot of ``folder`` under ``folder/plots``; their paths relative to ``folder``."""
    folder = pathlib.Path(folder)
    records = report.load_records(folder)
    out = folder / PLOTS_DIR
    out.mkdir(exist_ok=True)
    written = []
    accuracy_vs_budget(records, out / "accuracy_vs_budget.png")
    written.append(f"{PLOTS_DIR}/accuracy_vs_budget.png")
    speedup_vs_length(records, out / "speedup_vs_length.png")
    written.append(f"{PLOTS_DIR}/speedup_vs_length.png")
    if any(r["task"] == "needle" for r in records):
        needle_heatmap(records, out / "needle_heatmap.png")
        written.append(f"{PLOTS_DIR}/needle_heatmap.png")
    if attention_maps(records, folder / "attention_maps.pt", out / "attention_maps.png"):
        written.append(f"{PLOTS_DIR}/attention_maps.png")
    if fidelity_by_layer(records, out / "fidelity_by_layer.png"):
        written.append(f"{PLOTS_DIR}/fidelity_by_layer.png")
    return written


def render_all(folder: pathlib.Path) -> pathlib.Path:
    """Plots, then the Markdown and HTML reports; returns the Markdown report's path."""
    plots = render(folder)
    report.write_html(pathlib.Path(folder), plots)
    return report.write_markdown(pathlib.Path(folder), plots)
