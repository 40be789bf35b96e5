"""RazorAttention: echo and induction (retrieval) heads keep every key, the others a local window."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from longattn.method import register
from longattn.methods.duo_attention import RetrievalHeads


@register("razor_attention")
@dataclass(frozen=True)
class RazorAttention(RetrievalHeads):
    """Retrieval heads (echo and induction heads, found training-free) keep the whole cache; every
    other head keeps the ``sinks`` first and the ``recent`` newest tokens. Tang et al. 2024,
    arXiv:2407.15891.

    calibration: a file from ``longattn calibrate razor`` (``longattn.calibration.
                 calibrate_razor_attention``): per KV head, the echo score (attention of a token to
                 its previous occurrence) and the induction score (to the token that followed it)
                 on a repeated random-token sequence, and a rank that interleaves the two lists in
                 the paper's proportion (1 echo head per 14 induction heads). Required (a ValueError
                 at the first compression without one).
    retrieval:   fraction of all KV heads of the model protected (the paper: 15 %), chosen over
                 every layer at once.
    pattern:     explicit retrieval flags (1) per KV head, cycled over each layer's heads, in place
                 of a calibration (tests, ablations).
    compensate:  fold each non-retrieval head's dropped tokens into one compensation token, the
                 mean of their (rotated) keys and of their values, which attention weighs by the
                 number of tokens it stands for (the paper's Eq. 4-5; ``longattn.cache_summary``);
                 on by default as in the paper, ``compensate=false`` for the ablation.
    Every key scores +inf or -inf, so ``budget``, ``tokens`` and ``allocation`` do not apply.
    Defaults: the paper's 4 sink tokens; ``recent=256`` (see below); ``when="chunk"``.
    Deviation from paper: the local window is a fixed ``recent`` count, not the paper's max(4000,
    N / compression ratio), which exceeds the whole of a small model's 1-4K contexts. A KV head is a retrieval head when any query head of its
    GQA group scores high (the maximum over the group), since the group shares its cache.
    """

    calibration: str = ""
    retrieval: float = 0.15
    pattern: tuple[int, ...] | None = None
    sinks: int = 4
    recent: int = 256
    when: str = "chunk"
    compensate: bool = True

    command: ClassVar[str] = "razor"
