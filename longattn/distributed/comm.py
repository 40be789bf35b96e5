"""The few collectives the distributed methods use, each bounded by a timeout, and the protocol
that makes a failure on one rank an error on every rank.

Protocol: before any tensor moves, every rank publishes its metadata *or* its local error with one
``all_gather_object`` (``agree``); a rank that failed makes every rank raise, naming it. Errors
raised while computing (after the transfers began) are held while the rank keeps its part of the
transfer schedule, then published with one more ``all_gather_object`` (``settle``) before any result
is returned. A rank that never arrives (crashed, or raised outside these functions) fails the others
when the group's own timeout (``init_process_group(timeout=)``) or the ``timeout`` of a transfer wait
expires.

Without an initialised process group and with ``group=None``, the world is this one process and
nothing is communicated.
"""

from __future__ import annotations

import datetime
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 60.0


class RankError(RuntimeError):
    """A rank of the group failed; raised on every rank, naming the failed rank(s)."""


def rank_world(group: Any = None) -> tuple[int, int]:
    """(this process's rank in ``group``, the group's size); (0, 1) without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group: Any, rank: int) -> int:
    """The global rank of ``group``'s member ``rank`` (what point-to-point operations take)."""
    return rank if group is None else dist.get_global_rank(group, rank)


def check_timeout(timeout: float) -> datetime.timedelta:
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    return datetime.timedelta(seconds=float(timeout))


def _describe(exc: BaseException) -> tuple[str, str]:
    return type(exc).__name__, str(exc)


def _raise_failed(entries: list[Any]) -> None:
    """Raise on this rank if any entry is a published error ``("error", type name, message)``."""
    failed = [(r, e) for r, e in enumerate(entries) if isinstance(e, tuple) and e[0] == "error"]
    if not failed:
        return
    text = "; ".join(f"rank {r} raised {kind}: {msg}" for r, (_, kind, msg) in failed)
    kinds = {kind for _, (_, kind, _) in failed}
    if kinds == {"ValueError"}:
        raise ValueError(text)
    if kinds == {"TypeError"}:
        raise TypeError(text)
    raise RankError(text)


def all_gather_objects(value: Any, group: Any, world: int) -> list[Any]:
    if world == 1:
        return [value]
    entries: list[Any] = [None] * world
    dist.all_gather_object(entries, value, group=group)
    return entries


def agree(group: Any, world: int, compute_meta) -> list[dict]:
    """Every rank's metadata, ``compute_meta()`` run locally; if it raises on any rank, every rank
    raises (ValueError / TypeError when all failed ranks raised that, else ``RankError``) with
    each failed rank's number and message."""
    try:
        mine: Any = ("ok", compute_meta())
    except Exception as exc:  # published to every rank, then raised there
        mine = ("error", *_describe(exc))
    entries = all_gather_objects(mine, group, world)
    _raise_failed(entries)
    return [e[1] for e in entries]


def settle(group: Any, world: int, error: BaseException | None) -> None:
    """Publish this rank's held error (or None) and raise on every rank if any rank had one."""
    mine = None if error is None else ("error", *_describe(error))
    _raise_failed(all_gather_objects(mine, group, world))


def check_same(metas: list[dict], keys: tuple[str, ...]) -> None:
    """ValueError naming the rank and the value when a field differs from rank 0's."""
    for key in keys:
        for rank, meta in enumerate(metas[1:], start=1):
            if meta[key] != metas[0][key]:
                raise ValueError(
                    f"rank {rank} has {key}={meta[key]!r} but rank 0 has {key}={metas[0][key]!r}"
                )


def wait_all(works: list[Any], timeout: datetime.timedelta) -> None:
    """Wait on each work handle with ``timeout``; a transfer that does not finish raises."""
    for work in works:
        if not work.wait(timeout):
            raise RankError(f"a transfer did not finish within {timeout.total_seconds():g} s")


def start_exchange(
    group: Any,
    send: torch.Tensor | None,
    dst: int,
    recv: torch.Tensor | None,
    src: int,
) -> list[Any]:
    """Start sending ``send`` to group rank ``dst`` and receiving into ``recv`` from ``src``
    (either may be None); returns the work handles."""
    ops = []
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send, global_rank(group, dst), group))
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv, global_rank(group, src), group))
    return dist.batch_isend_irecv(ops) if ops else []


def broadcast(tensor: torch.Tensor, src: int, group: Any, timeout: datetime.timedelta) -> None:
    """In-place broadcast from group rank ``src``, waited on with ``timeout``."""
    work = dist.broadcast(tensor, global_rank(group, src), group=group, async_op=True)
    wait_all([work], timeout)


def all_gather(tensor: torch.Tensor, world: int, group: Any, timeout: datetime.timedelta):
    """Every rank's ``tensor`` (same shape on each rank), waited on with ``timeout``."""
    parts = [torch.empty_like(tensor) for _ in range(world)]
    work = dist.all_gather(parts, tensor.contiguous(), group=group, async_op=True)
    wait_all([work], timeout)
    return parts
