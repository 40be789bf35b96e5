"""DuoAttention's retrieval-head identification on a Hugging Face model: per-KV-head gates mixing
full and streaming attention, trained against the full-attention model. Xiao et al. 2024,
arXiv:2410.10819.

The mixed attention is registered through transformers' ``AttentionInterface`` under a fresh name
per use (``gated``); no module's ``forward`` is replaced. Only the gates train: the model's weights
are frozen for the duration of ``train_gates`` and restored afterwards.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import pathlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from longattn.integrations.hf import attn_implementation

_names = itertools.count()
CHECKPOINT_KEY = "longattn_gates_checkpoint"


def streaming_visible(
    q_len: int, kv_len: int, sinks: int, recent: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """bool [Tq, Tk]: causal sinks + recent window (queries are the last ``q_len`` positions)."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    kv_pos = torch.arange(kv_len, device=device)[None, :]
    return (kv_pos <= q_pos) & ((kv_pos < sinks) | (q_pos - kv_pos < recent))


def mixed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    gates: torch.Tensor,
    sinks: int,
    recent: int,
    scale: float | None = None,
) -> torch.Tensor:
    """``alpha * full + (1 - alpha) * streaming`` per KV head, differentiable in everything.

    query [B, H, Tq, D], key/value [B, Hkv, Tk, D], gates [Hkv] (alpha); returns [B, H, Tq, D].
    ``full`` is causal attention over every key, ``streaming`` over the first ``sinks`` positions
    and the last ``recent`` keys of each query (StreamingLLM's pattern)."""
    n_heads, n_kv_heads = query.shape[1], key.shape[1]
    if n_heads % n_kv_heads or gates.shape != (n_kv_heads,):
        raise ValueError(
            f"gates must be [n_kv_heads={n_kv_heads}] with {n_heads} query heads, "
            f"got {tuple(gates.shape)}"
        )
    groups = n_heads // n_kv_heads
    key = key.repeat_interleave(groups, dim=1)  # [B, H, Tk, D]
    value = value.repeat_interleave(groups, dim=1)
    q_len, kv_len = query.shape[2], key.shape[2]
    stream = streaming_visible(q_len, kv_len, sinks, recent, query.device)
    if q_len == kv_len:
        full = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
    else:
        causal = streaming_visible(q_len, kv_len, kv_len, kv_len, query.device)
        full = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scale)
    streaming = F.scaled_dot_product_attention(query, key, value, attn_mask=stream, scale=scale)
    alpha = gates.to(query.dtype).repeat_interleave(groups)[None, :, None, None]  # [1, H, 1, 1]
    return alpha * full + (1 - alpha) * streaming


@contextlib.contextmanager
def gated(
    model: torch.nn.Module, gates: torch.Tensor, sinks: int, recent: int
) -> Iterator[torch.nn.Module]:
    """Run ``model`` with every layer's attention mixed by ``gates`` [n_layers, n_kv_heads]."""
    config = model.config
    want = (config.num_hidden_layers, config.num_key_value_heads)
    if tuple(gates.shape) != want:
        raise ValueError(f"gates must be [n_layers, n_kv_heads] = {want}, got {tuple(gates.shape)}")

    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        # a registered custom name receives no mask: only unpadded batches reach this function
        out = mixed_attention(query, key, value, gates[module.layer_idx], sinks, recent, scaling)
        return out.transpose(1, 2).contiguous(), None  # [B, Tq, H, D]

    name = f"longattn_gated_{next(_names)}"
    AttentionInterface.register(name, attend)
    with attn_implementation(model, name):
        yield model


@dataclass(frozen=True)
class GateTraining:
    """Settings of the gate optimisation. As in the paper: Adam, L1 weight 0.05, gates start at 1
    and are clamped to [0, 1] after every step, the learning rate warms up and decays over a fifth
    of the steps each, never below a tenth. Not as in the paper (2,000 steps at lr 0.02 on 8 GPUs):
    40 steps at lr 0.04, so that the schedule's total step (about 0.8 * steps * lr, Adam's steps
    being about lr each) can still carry a gate across [0, 1] within minutes on 2 CPU cores."""

    steps: int = 40
    sinks: int = 64
    recent: int = 256
    lr: float = 0.04
    reg: float = 0.05
    save_every: int = 5

    def __post_init__(self) -> None:
        for key in ("steps", "save_every", "recent"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GateTraining.{key} must be an int > 0, got {value!r}")
        if isinstance(self.sinks, bool) or not isinstance(self.sinks, int) or self.sinks < 0:
            raise ValueError(f"GateTraining.sinks must be an int >= 0, got {self.sinks!r}")
        for key in ("lr", "reg"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"GateTraining.{key} must be >= 0, got {getattr(self, key)!r}")

    def lr_at(self, step: int) -> float:
        ramp = max(self.steps // 5, 1)
        up, down = max((step + 1) / ramp, 0.1), max((self.steps - step) / ramp, 0.1)
        return self.lr * min(1.0, up, down)

    def identity(self) -> dict[str, Any]:
        """What a checkpoint must agree on to be continued (the step count may grow)."""
        return {k: v for k, v in asdict(self).items() if k not in ("steps", "save_every")}


Batch = Callable[[int], tuple[torch.Tensor, torch.Tensor]]


def distill_loss(
    model: torch.nn.Module, input_ids: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Mean over the masked positions of the squared error of the last hidden states, averaged
    over the hidden size (the paper's distillation loss)."""
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    return (hidden[mask].float() - target).pow(2).mean(-1).mean()


def train_gates(
    model: torch.nn.Module,
    batch: Batch,
    settings: GateTraining,
    checkpoint: str | os.PathLike,
    *,
    tag: dict[str, Any] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> torch.Tensor:
    """Optimise per-KV-head gates [n_layers, n_kv_heads] in [0, 1] (Adam, model frozen).

    ``batch(step)`` gives ``(input_ids [B, T], mask [B, T] bool)``: the positions whose last hidden
    state is compared with the full-attention model's (the answers after the passkeys); it must be
    deterministic in ``step`` so that a resumed run sees the same data. Every ``save_every`` steps
    the gates, Adam's moments and the step are written to ``checkpoint`` (safetensors); a later
    call with the same settings and ``tag`` continues from there. ``on_step(step, losses)`` reports
    progress. Returns the gates (detached)."""
    config = model.config
    shape = (config.num_hidden_layers, config.num_key_value_heads)
    gates = torch.nn.Parameter(torch.ones(shape, dtype=torch.float32))
    optimizer = torch.optim.Adam([gates], lr=settings.lr)
    identity = {**settings.identity(), **(tag or {})}
    start = _resume(pathlib.Path(checkpoint), gates, optimizer, identity)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    original = model.config._attn_implementation
    try:
        with gated(model, gates, settings.sinks, settings.recent):  # one registration per run
            for step in range(start, settings.steps):
                with attn_implementation(model, original):  # the full-attention reference
                    target = _reference(model, batch(step), step)
                losses = _step(model, target, gates, optimizer, settings, step)
                if (step + 1) % settings.save_every == 0 or step + 1 == settings.steps:
                    _save(pathlib.Path(checkpoint), gates, optimizer, step + 1, identity)
                if on_step is not None:
                    on_step(step + 1, losses)
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return gates.detach().clone()


@torch.no_grad()
def _reference(model, data, step: int):
    """(input_ids, mask, the full-attention model's last hidden states at the masked positions)."""
    input_ids, mask = data
    if mask.shape != input_ids.shape or mask.dtype != torch.bool or not mask.any():
        raise ValueError(f"batch({step}) must give a bool mask shaped like the ids with a True")
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    return input_ids, mask, hidden[mask].float()


def _step(
    model, reference, gates, optimizer, settings: GateTraining, step: int
) -> dict[str, float]:
    """One optimiser step of the gates; ``model`` runs the gated attention."""
    input_ids, mask, target = reference
    for group in optimizer.param_groups:
        group["lr"] = settings.lr_at(step)
    distill = distill_loss(model, input_ids, target, mask)
    reg = gates.abs().mean()
    loss = distill + settings.reg * reg
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        gates.clamp_(0.0, 1.0)
    return {"distill": distill.item(), "reg": reg.item(), "lr": settings.lr_at(step)}


def _save(path: pathlib.Path, gates, optimizer, step: int, identity: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    state = optimizer.state.get(gates, {})
    tensors = {"gates": gates.detach().clone()}
    if state:
        tensors |= {"exp_avg": state["exp_avg"].clone(), "exp_avg_sq": state["exp_avg_sq"].clone()}
    meta = {"step": step, "identity": identity}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={CHECKPOINT_KEY: json.dumps(meta)})
    os.replace(partial, path)  # a crash mid-write never leaves a torn checkpoint


def _resume(path: pathlib.Path, gates, optimizer, identity: dict[str, Any]) -> int:
    """Load a checkpoint into ``gates`` and ``optimizer``; the step to continue from (0: none)."""
    if not path.is_file():
        return 0
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        raw = (fh.metadata() or {}).get(CHECKPOINT_KEY)
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if raw is None:
        raise ValueError(f"{path} is not a gate checkpoint (no {CHECKPOINT_KEY!r} header)")
    meta = json.loads(raw)
    if meta["identity"] != json.loads(json.dumps(identity)):
        raise ValueError(
            f"checkpoint {path} was made with {meta['identity']}, not {identity}: "
            "remove it or write elsewhere"
        )
    if tensors["gates"].shape != gates.shape:
        raise ValueError(
            f"checkpoint {path} holds gates {tuple(tensors['gates'].shape)}, "
            f"the model needs {tuple(gates.shape)}"
        )
    with torch.no_grad():
        gates.copy_(tensors["gates"])
    if "exp_avg" in tensors:
        optimizer.state[gates] = {
            "step": torch.tensor(float(meta["step"])),
            "exp_avg": tensors["exp_avg"],
            "exp_avg_sq": tensors["exp_avg_sq"],
        }
    return int(meta["step"])
