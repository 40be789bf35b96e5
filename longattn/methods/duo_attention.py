"""DuoAttention: retrieval heads keep every key, streaming heads only the sinks and a recent window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from longattn.method import Evict, register


def check_head_fields(method: Any) -> None:
    """Shared validation of the head-wise methods' ``retrieval`` and ``pattern`` fields."""
    name = type(method).__name__
    if not 0.0 <= method.retrieval <= 1.0:
        raise ValueError(f"{name}.retrieval must be in [0, 1], got {method.retrieval}")
    if method.pattern is None:
        return
    if not method.pattern or any(flag not in (0, 1) for flag in method.pattern):
        raise ValueError(f"{name}.pattern must be a non-empty tuple of 0/1, got {method.pattern!r}")
    if method.calibration:
        raise ValueError(f"{name}: give a calibration or a pattern, not both")


def retrieval_heads(method: Any, view: Any, calibrate: str) -> torch.Tensor:
    """bool [Hkv]: which KV heads of ``view``'s layer are retrieval heads.

    From the calibration's ``rank`` (each head's place among all heads of the model, best first):
    the ``round(retrieval * n_layers * n_kv_heads)`` best heads of the whole model, so the split
    follows one global threshold, not a per-layer quota. From ``pattern`` (cycled over the KV heads)
    when one is given."""
    n_kv = view.keys.shape[1]
    device = view.keys.device
    if method.pattern is not None:
        flags = torch.tensor(method.pattern, dtype=torch.bool, device=device)
        return flags[torch.arange(n_kv, device=device) % len(method.pattern)]
    name = type(method).__name__
    if view.calibration is None:
        raise ValueError(
            f"{name} needs a calibration file: calibration=PATH (made by `longattn calibrate "
            f"{calibrate}`), or an explicit pattern"
        )
    rank = view.calibration.get("rank")
    n_heads = view.n_layers * n_kv
    if rank is None or tuple(rank.shape) != (n_kv,) or rank.dtype.is_floating_point:
        got = None if rank is None else (tuple(rank.shape), rank.dtype)
        raise ValueError(f"{name}: the calibration must hold an integer 'rank' [{n_kv}], got {got}")
    if int(rank.min()) < 0 or int(rank.max()) >= n_heads:
        raise ValueError(
            f"{name}: calibration ranks must lie in [0, {n_heads}) for {view.n_layers} layers x "
            f"{n_kv} KV heads, got [{int(rank.min())}, {int(rank.max())}]"
        )
    keep = int(method.retrieval * n_heads + 0.5)  # half up, not Python's half-to-even
    return rank.to(device) < keep


def head_scores(view: Any, retrieval: torch.Tensor) -> torch.Tensor:
    """[B, Hkv, T] float32: +inf on every key of a retrieval head, -inf on a streaming head's."""
    batch, n_kv, seq_len, _ = view.keys.shape
    inf = torch.full((), torch.inf, device=view.keys.device)
    per_head = torch.where(retrieval, inf, -inf)  # [Hkv]
    return per_head[None, :, None].expand(batch, n_kv, seq_len).contiguous()


@dataclass(frozen=True)
class RetrievalHeads(Evict):
    """Base of the head-wise methods (DuoAttention, RazorAttention): a KV head is a retrieval head
    (keeps everything) or a streaming head (keeps ``sinks`` + ``recent``), by a calibration file's
    head ranks or an explicit ``pattern``; ``budget``, ``tokens`` and ``allocation`` do not apply."""

    calibration: str = ""
    retrieval: float = 0.5
    pattern: tuple[int, ...] | None = None

    needs: ClassVar[frozenset[str]] = frozenset()
    command: ClassVar[str] = ""  # the `longattn calibrate` command that makes its files

    def __post_init__(self) -> None:
        super().__post_init__()
        check_head_fields(self)

    def score(self, view):
        return head_scores(view, retrieval_heads(self, view, self.command))


@register("duo_attention")
@dataclass(frozen=True)
class DuoAttention(RetrievalHeads):
    """Retrieval heads keep the whole cache, streaming heads keep the ``sinks`` first and the
    ``recent`` newest tokens; the heads are told apart by gates optimised offline on synthetic
    passkey retrieval. Xiao et al. 2024, arXiv:2410.10819.

    calibration: a file from ``longattn calibrate duo`` (``longattn.eval.calibrate.run_duo``): per
                 KV head, the gate alpha in [0, 1] of ``alpha * full + (1 - alpha) * streaming``
                 attention, trained against the full-attention model's hidden states with an L1
                 penalty, and each head's rank by gate over the whole model. Required (a
                 ValueError at the first compression without one); the library refuses a file
                 made for another method or model shape.
    retrieval:   fraction of all KV heads of the model kept as retrieval heads: those of the
                 largest gates, by one threshold over every layer as in the paper (0: StreamingLLM
                 in every head; 1: nothing evicted).
    pattern:     explicit retrieval flags (1) per KV head, cycled over each layer's heads, in place
                 of a calibration (tests, ablations).
    Every key scores +inf (retrieval head) or -inf (streaming head), so ``budget``, ``tokens`` and
    ``allocation`` do not apply: memory is set by ``retrieval``, ``sinks`` and ``recent``.
    Defaults: ``sinks=64, recent=256``, the paper's streaming configuration (its calibration runs
    with 128 sinks; for the 1-4K contexts of a small model 64 suffice), also used by the shipped
    SmolLM2-135M calibration; ``when="chunk"`` keeps streaming heads bounded during chunked prefill.
    Deviation from paper: streaming heads are bounded by eviction in the shared cache (their
    attention is dense over what they hold), not by a separate constant-size cache; a GQA group
    shares its KV head's decision, as in the paper.
    """

    calibration: str = ""
    retrieval: float = 0.5
    pattern: tuple[int, ...] | None = None
    sinks: int = 64
    recent: int = 256
    when: str = "chunk"

    command: ClassVar[str] = "duo"
