"""``longattn calibrate minference``: MInference's offline per-head pattern search (Jiang et al.
2024, arXiv:2407.02490, section 3.2 "kernel-aware optimal sparse pattern search").

On calibration text of the real model, each layer's post-RoPE queries and keys are captured once;
for every head, every candidate (pattern, budget) on a grid is planned as ``MInference`` would plan
it at run time, and scored by its attention recall (the exact softmax mass of each query that the
visible keys hold, averaged over the queries) and its density (visible causal pairs over all causal
pairs). Per head the candidate of best recall within the target density wins (the sparsest one when
none fits). The result is a ``longattn.calibration`` file: ``pattern``, ``budget``, ``vertical``,
``recall`` and ``density``, each [n_layers, n_kv_heads, group].
Deviation from paper: candidates are matched by realised density, not by a FLOPs estimate of the
GPU kernel; the search reads one sample of real text (the paper's is one synthetic sample too).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
from dataclasses import asdict, dataclass

import torch

from longattn import prefill
from longattn.calibration import Calibration
from longattn.call import make_call
from longattn.methods.minference import PATTERNS, MInference
from longattn.types import BlockIndex

# The grid: (pattern, budget, vertical). vs: diagonals and columns as fractions of the keys.
BUDGETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)
VERTICALS = (0.01, 0.03, 0.1)


@dataclass(frozen=True)
class SearchSettings:
    """What a search depends on (a checkpoint resumes only under the same settings)."""

    model: str = "smollm2-135m"
    corpus: str = "pydoc"
    length: int = 2048
    target: float = 0.2
    block_size: int = 64
    last_q: int = 64

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"target density must be in (0, 1], got {self.target}")
        if self.length < 2 * self.block_size:
            raise ValueError(f"length {self.length} must hold two blocks of {self.block_size}")


def candidates(settings: SearchSettings) -> list[MInference]:
    common = dict(block_size=settings.block_size, last_q=settings.last_q)
    found = [
        MInference(pattern=p, budget=b, **common) for p in ("ashape", "block") for b in BUDGETS
    ]
    found += [
        MInference(pattern="vs", budget=b, vertical=v, **common) for b in BUDGETS for v in VERTICALS
    ]
    return found


def _visible(view, method: MInference) -> torch.Tensor:
    """bool [B, H, Tq, Tk]: what ``method``'s plan on ``view`` lets each query see, as
    ``longattn.prefill.plan_index`` and the kernels run it (the dense form, for tests)."""
    blocks, columns = _planned(view, method)
    q_len, kv_len = view.q.shape[2], view.k.shape[2]
    index = BlockIndex.from_block_mask(blocks, method.block_size, q_len=q_len, kv_len=kv_len)
    visible = index.to_dense()
    if columns is not None:
        visible = visible | prefill.columns_dense(columns, method.block_size, q_len, kv_len)
    causal = view.kv_pos[:, None, None, :] <= view.q_pos[:, None, :, None]
    return visible & causal


def _planned(view, method: MInference) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(blocks [B, H, nq, nk], columns [B, H, nq, n] or None) as ``plan_index`` finalises them."""
    plan = method.plan(view)
    blocks = ((plan.blocks | view.forced) & view.causal).expand(*view.q.shape[:2], -1, -1)
    return blocks, prefill.tidy_columns(plan.columns, blocks, method.block_size, view.causal)


def _per_block(x: torch.Tensor, block: int, dim: int) -> torch.Tensor:
    """Sums of ``x`` over consecutive ``block`` entries along ``dim`` (zero-padded at the end)."""
    n = -(-x.shape[dim] // block)
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, n * block - x.shape[dim]]
    x = torch.nn.functional.pad(x, pad)
    return x.unflatten(dim, (n, block)).sum(dim + 1 if dim >= 0 else dim)


@torch.no_grad()
def search_layer(q, k, v, settings: SearchSettings, layer: int) -> dict[str, torch.Tensor]:
    """Per query head [H]: the chosen pattern index, budget, vertical, its recall and density.
    Each candidate is scored from per-block sums of the exact weights (no T x T mask per
    candidate): its blocks' mass, plus its columns' mass within each query block."""
    grid = candidates(settings)
    block = settings.block_size
    call = dataclasses.replace(make_call(q.float(), k.float(), v.float(), grid[0]), layer=layer)
    view = prefill.make_view(call)  # its estimators are shared by every candidate
    keys = k.float().repeat_interleave(q.shape[1] // k.shape[1], 1)  # [1, H, Tk, D]
    causal = view.kv_pos[:, None, None, :] <= view.q_pos[:, None, :, None]  # [1, 1, Tq, Tk]
    logits = (q.float() @ keys.transpose(-1, -2)) * call.scale
    weights = torch.softmax(logits.masked_fill(~causal, -torch.inf), dim=-1)[0]  # [H, Tq, Tk]
    column_mass = _per_block(weights, block, 1)  # [H, nq, Tk]
    block_mass = _per_block(column_mass, block, -1)  # [H, nq, nk]
    column_pairs = _per_block(causal[0, 0].float(), block, 0)  # [nq, Tk]
    block_pairs = _per_block(column_pairs, block, -1)  # [nq, nk]
    q_len, heads = q.shape[2], q.shape[1]
    recall = torch.empty(len(grid), heads)
    density = torch.empty(len(grid), heads)
    for i, method in enumerate(grid):
        blocks, columns = _planned(view, method)
        blocks = blocks[0].float()  # [H, nq, nk]
        mass, pairs = (block_mass * blocks).sum((-1, -2)), (block_pairs * blocks).sum((-1, -2))
        if columns is not None:
            cols, used = columns[0].clamp(min=0), (columns[0] >= 0).float()  # [H, nq, n]
            mass = mass + (column_mass.gather(-1, cols) * used).sum((-1, -2))
            col_pairs = column_pairs.expand(heads, -1, -1).gather(-1, cols)
            pairs = pairs + (col_pairs * used).sum((-1, -2))
        recall[i] = mass / q_len
        density[i] = pairs / column_pairs.sum()
    fits = density <= settings.target + 1e-9
    score = torch.where(fits, recall, -1.0 - density)  # none fits: the sparsest
    best = score.argmax(0)  # [H]
    return {
        "pattern": torch.tensor([PATTERNS.index(grid[i].pattern) for i in best]),
        "budget": torch.tensor([grid[i].budget for i in best], dtype=torch.float64),
        "vertical": torch.tensor([grid[i].vertical for i in best], dtype=torch.float64),
        "recall": recall.gather(0, best[None])[0],
        "density": density.gather(0, best[None])[0],
    }


def _load_checkpoint(path: pathlib.Path, settings: SearchSettings) -> dict[int, dict]:
    """The layers a checkpoint under the same settings holds (an empty dict otherwise)."""
    if not path.is_file():
        return {}
    from safetensors import safe_open
    from safetensors.torch import load_file

    from longattn.calibration import META_KEY

    with safe_open(str(path), framework="pt") as fh:
        meta = json.loads((fh.metadata() or {}).get(META_KEY, "{}"))
    if meta.get("settings") != asdict(settings):
        return {}
    tensors = load_file(str(path))
    done: dict[int, dict] = {}
    for key, t in tensors.items():
        layer, name = key.split(".", 1)
        done.setdefault(int(layer), {})[name] = t
    return done


def _save_checkpoint(path: pathlib.Path, settings: SearchSettings, done: dict[int, dict]) -> None:
    from safetensors.torch import save_file

    from longattn.calibration import META_KEY

    tensors = {f"{layer}.{name}": t for layer, part in done.items() for name, t in part.items()}
    meta = {META_KEY: json.dumps({"settings": asdict(settings)})}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def search(
    model, input_ids: torch.Tensor, settings: SearchSettings, out: pathlib.Path, progress=None
) -> Calibration:
    """Search every layer of ``model`` on ``input_ids`` [1, T]; checkpoint after each layer to
    ``<out>.checkpoint`` (a rerun resumes there), then write ``out``."""
    from longattn.integrations.hf import capture_qkv

    config = model.config
    n_layers, n_kv = config.num_hidden_layers, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    checkpoint = out.with_name(out.name + ".checkpoint")
    done = _load_checkpoint(checkpoint, settings)
    todo = [layer for layer in range(n_layers) if layer not in done]
    captured = capture_qkv(model, input_ids, layers=todo) if todo else {}
    for layer in todo:
        done[layer] = search_layer(*captured.pop(layer), settings, layer)
        _save_checkpoint(checkpoint, settings, done)
        if progress is not None:
            progress(len(done), {"recall": float(done[layer]["recall"].mean())})
    tensors = {
        name: torch.stack([done[layer][name] for layer in range(n_layers)]).view(n_layers, n_kv, -1)
        for name in ("pattern", "budget", "vertical", "recall", "density")
    }
    cal = Calibration(
        "minference", settings.model, n_layers, n_kv, head_dim, tensors, asdict(settings)
    )
    cal.save(out)
    checkpoint.unlink(missing_ok=True)
    return cal


def calibration_ids(tokenizer, settings: SearchSettings) -> torch.Tensor:
    """[1, length] token ids of the start of the corpus (BOS first where the model has one)."""
    from longattn.eval.text import corpus

    text = corpus(settings.corpus)[: 16 * settings.length]  # ample: tokens are > 1 character
    ids = tokenizer(text, return_tensors="pt").input_ids[:, : settings.length]
    if ids.shape[1] < settings.length:
        raise ValueError(f"corpus {settings.corpus!r} has only {ids.shape[1]} tokens")
    return ids


def run_minference(
    settings: SearchSettings, out: pathlib.Path, progress: bool = True
) -> tuple[pathlib.Path, float]:
    """The pattern search on the real model ``settings.model``; returns the file and the seconds
    this call spent (load included)."""
    from longattn.eval.calibrate import _progress
    from longattn.eval.models import load

    start = time.perf_counter()
    model, tokenizer = load(settings.model)
    ids = calibration_ids(tokenizer, settings)
    with _progress(progress, model.config.num_hidden_layers, "minference layers") as report:
        search(model, ids, settings, out, report)
    return out, time.perf_counter() - start
