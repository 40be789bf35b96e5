"""The optional LoRA pass after an attention transfer (LoLCATs' second step, ``longattn distill
--lora-steps``): low-rank adapters (``peft``) on the attention projections of a model running the
converted attention, trained with the next-token loss."""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraSettings:
    """The optional LoRA pass after the transfer (LoLCATs' second step): rank-``rank`` adapters on
    the attention projections, next-token loss on the training windows, AdamW at ``lr``."""

    steps: int = 0
    rank: int = 8
    lr: float = 2e-4
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        for key in ("steps", "rank"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (key == "rank"):
                raise ValueError(f"LoraSettings.{key} must be an int >= {int(key == 'rank')}, "
                                 f"got {value!r}")  # fmt: skip
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"LoraSettings.lr must be a finite float > 0, got {self.lr!r}")


def lora_pass(
    model,
    method,
    windows: Sequence[Sequence[int]],
    settings: LoraSettings,
    out: pathlib.Path,
    on_step: Callable[[int, dict], None] | None = None,
) -> list[float]:
    """Train LoRA adapters (``peft``) on ``model`` running ``method`` (the converted attention,
    through ``longattn.integrations.hf.use``) with the next-token loss on ``windows``, one per
    step in turn; save the adapter to the folder ``out`` (peft's format). The model's own weights
    stay frozen; the adapters stay in ``model`` (merged into nothing). Returns the losses."""
    from peft import LoraConfig, get_peft_model

    from longattn.integrations.hf import use

    config = LoraConfig(r=settings.rank, lora_alpha=2 * settings.rank, lora_dropout=0.0,
                        target_modules=list(settings.targets), bias="none")  # fmt: skip
    wrapped = get_peft_model(model, config)  # adds the adapters to ``model`` in place
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    losses = []
    model.eval()  # no dropout (hf.use refuses it); gradients still flow
    with use(model, method):
        for step in range(settings.steps):
            ids = torch.tensor([list(windows[step % len(windows)])])
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if not math.isfinite(losses[-1]):
                raise ValueError(f"LoRA pass: the loss is {losses[-1]} at step {step}")
            if on_step is not None:
                on_step(step + 1, {"lora_loss": losses[-1]})
    wrapped.save_pretrained(str(out))
    return losses
