"""Run a function on ``world`` local gloo processes (tests and small demos; ``torchrun`` is the
launcher for real runs). Never leaves a process behind: on timeout every worker is killed."""

from __future__ import annotations

import datetime
import io
import multiprocessing
import os
import queue
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import torch


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _to_bytes(value: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _worker(fn, rank, world, port, results, args, timeout_s, threads) -> None:
    os.setsid()  # its own process group: a kill on timeout reaches the worker's children too
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    import torch.distributed as dist

    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=timeout_s),
        )  # fmt: skip
        value = ("ok", fn(rank, world, *args))
    except Exception as exc:  # reported to the parent, which raises it
        value = ("error", f"{type(exc).__name__}: {exc}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    results.put((rank, _to_bytes(value)))


def _kill_group(pid: int) -> None:
    """Kill a worker and everything it started (compilers, ...): its own process group."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_local(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    timeout: float = 60.0,
    threads: int = 1,
    preload: tuple[str, ...] = (),
) -> list[Any]:
    """``[fn(rank, world, *args) for each rank]``, each rank its own process (forked from a fork server) in one gloo
    group (its collectives time out after ``timeout`` s). ``fn`` must be importable (module level).

    Raises RuntimeError naming the ranks whose ``fn`` raised, or that did not answer within
    ``timeout`` + 60 s (start-up included), after killing every worker."""
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world must be an int >= 1, got {world!r}")
    # a fork server that has imported torch once starts workers in a fraction of a spawn's time;
    # it has run no torch operation, so forking it is safe
    ctx = multiprocessing.get_context("forkserver")
    # (the server starts at the first call of a process: ``preload`` modules, e.g. "transformers",
    # then load once, and a module that fails to import is skipped)
    ctx.set_forkserver_preload(["torch", "torch.distributed", "longattn.distributed", *preload])
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(fn, r, world, port, results, args, timeout, threads))
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    answers: dict[int, Any] = {}
    deadline = time.monotonic() + timeout + 60.0
    try:
        while len(answers) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, payload = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
                continue
            answers[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for proc in procs:
            proc.join(timeout=5.0)
            if proc.is_alive():
                _kill_group(proc.pid)
                proc.join()
    missing = [r for r in range(world) if r not in answers]
    failed = [f"rank {r}: {answers[r][1]}" for r in sorted(answers) if answers[r][0] == "error"]
    if missing or failed:
        raise RuntimeError(
            "; ".join(failed + ([f"ranks {missing} gave no answer"] if missing else []))
        )
    return [answers[r][1] for r in range(world)]
