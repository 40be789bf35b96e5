"""How a sequence is dealt to the ranks of a group: contiguous, striped and zig-zag layouts.

Rule for any length ``T >= world`` (uneven lengths included):

* ``contiguous``: rank r holds one run of consecutive tokens; the first ``T % world`` ranks hold
  ``T // world + 1`` tokens, the others ``T // world`` (``torch.tensor_split``'s rule).
* ``striped``: token t goes to rank ``t % world`` (Brandon et al. 2023, Striped Attention,
  arXiv:2311.09431): the first ``T % world`` ranks hold one token more.
* ``zigzag``: the sequence is cut into ``2 * world`` contiguous chunks by ``tensor_split``'s rule and
  rank r holds chunks ``r`` and ``2 * world - 1 - r`` (an early and a late chunk, so causal work is
  balanced), in sequence order.

Every rank's positions are increasing, so a shard is in sequence order.
"""

from __future__ import annotations

import torch

LAYOUTS = ("contiguous", "striped", "zigzag")


def check_layout(length: int, rank: int, world: int, layout: str) -> None:
    """ValueError naming the bad value for an unknown layout, a rank outside the group or a
    sequence shorter than the group."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be an int >= 1, got {world!r}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"rank must be an int in [0, {world}), got {rank!r}")
    if not isinstance(length, int) or length < world:
        raise ValueError(
            f"sequence length {length!r} must be an int >= the world size {world} "
            "(every rank holds at least one token)"
        )


def _chunk_bounds(length: int, parts: int) -> list[int]:
    """Starts of ``parts`` chunks by ``tensor_split``'s rule, plus ``length`` at the end."""
    base, extra = divmod(length, parts)
    starts = [0]
    for i in range(parts):
        starts.append(starts[-1] + base + (1 if i < extra else 0))
    return starts


def shard_positions(length: int, rank: int, world: int, layout: str = "contiguous") -> torch.Tensor:
    """The global positions (int64, increasing) of the tokens that ``rank`` holds."""
    check_layout(length, rank, world, layout)
    if layout == "striped":
        return torch.arange(rank, length, world)
    if layout == "contiguous":
        bounds = _chunk_bounds(length, world)
        return torch.arange(bounds[rank], bounds[rank + 1])
    bounds = _chunk_bounds(length, 2 * world)
    late = 2 * world - 1 - rank
    return torch.cat(
        [torch.arange(bounds[rank], bounds[rank + 1]), torch.arange(bounds[late], bounds[late + 1])]
    )


def shard_length(length: int, rank: int, world: int, layout: str = "contiguous") -> int:
    """How many tokens ``rank`` holds (without building the positions)."""
    return int(shard_positions(length, rank, world, layout).numel())


def shard(x: torch.Tensor, rank: int, world: int, layout: str = "contiguous", dim: int = 2):
    """The part of ``x`` (the whole sequence along ``dim``) that ``rank`` holds."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    positions = shard_positions(x.shape[dim], rank, world, layout).to(x.device)
    return x.index_select(dim, positions)


def unshard(shards: list[torch.Tensor], layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """The whole sequence from every rank's shard (in rank order): the inverse of ``shard``."""
    if not shards:
        raise ValueError("unshard needs at least one shard")
    world = len(shards)
    length = sum(s.shape[dim] for s in shards)
    for rank, part in enumerate(shards):
        expected = shard_length(length, rank, world, layout)
        if part.shape[dim] != expected:
            raise ValueError(
                f"rank {rank}'s shard has {part.shape[dim]} tokens along dim {dim}; the {layout} "
                f"layout of {length} tokens over {world} ranks gives it {expected}"
            )
    shape = list(shards[0].shape)
    shape[dim] = length
    out = shards[0].new_empty(shape)
    for rank, part in enumerate(shards):
        positions = shard_positions(length, rank, world, layout).to(out.device)
        out.index_copy_(dim, positions, part)
    return out
