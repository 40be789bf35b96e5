"""Distributed attention over ``torch.distributed`` (gloo on CPU, NCCL on GPU).

Ring attention in contiguous, striped and zig-zag layouts (``ring_attention``), LASP-2 for linear
attention (``lasp2_attention``) and Star Attention's two-phase approximation (``star_attention``),
with the helpers that deal a sequence to the ranks (``shard``, ``unshard``, ``shard_positions``).
Importing this package initialises nothing; the caller owns the process group.
"""

from longattn.distributed.lasp2 import lasp2_attention
from longattn.distributed.layout import LAYOUTS, shard, shard_length, shard_positions, unshard
from longattn.distributed.ring import RingRecord, ring_attention
from longattn.distributed.star import star_attention, star_visible

__all__ = [
    "LAYOUTS",
    "RingRecord",
    "lasp2_attention",
    "ring_attention",
    "shard",
    "shard_length",
    "shard_positions",
    "star_attention",
    "star_visible",
    "unshard",
]
