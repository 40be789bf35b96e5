"""Star Attention's error against exact causal attention on q/k/v captured from a real model.

The computed quantity is the mask that ``longattn.distributed.star_attention`` evaluates exactly
(``star_visible``; ``tests/test_distributed.py`` checks the distributed call against it on 2 and 4
ranks), so the error for W ranks needs no W processes. Reported per rank count: the relative error
``||out - exact|| / ||exact||`` over the context rows and over the query rows (exact by
construction), mean and worst over a spread of layers (``LAYERS``).
"""

from __future__ import annotations

import os
import statistics

import torch

from longattn.bench.common import environment
from longattn.distributed import star_visible
from longattn.kernels.reference import reference_attention


def star_errors(captured: dict, worlds: tuple[int, ...], n_query: int) -> list[dict]:
    context: dict[int, list[float]] = {w: [] for w in worlds}
    query: dict[int, list[float]] = {w: [] for w in worlds}
    for layer in sorted(captured):
        q, k, v = (t.float() for t in captured[layer])
        length, scale = q.shape[2], q.shape[-1] ** -0.5
        split = length - n_query
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        exact = reference_attention(q, k, v, causal, scale).out
        for world in worlds:
            star = reference_attention(q, k, v, star_visible(length, world, n_query), scale).out
            diff = star - exact
            context[world].append(float(diff[:, :, :split].norm() / exact[:, :, :split].norm()))
            query[world].append(float(diff[:, :, split:].norm() / exact[:, :, split:].norm()))
    return [{"bench": "star_error", "world": w, "T": length, "n_query": n_query,
             "context_rel_err_mean": statistics.mean(context[w]),
             "context_rel_err_max": max(context[w]), "query_rel_err_max": max(query[w]),
             "layers": sorted(captured)} for w in worlds]  # fmt: skip


LAYERS = [0, 5, 10, 15, 20, 25, 29]  # a spread of the 30 layers (each costs two T x T passes)


def run(args, writer) -> list[dict]:
    """Load the model offline, capture one window of real text, return and write the rows."""
    from longattn.eval import models, tasks
    from longattn.integrations.hf import capture_qkv

    model, tokenizer = models.load(args.model)
    length = args.length
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", length, 0)])
    rows = star_errors(capture_qkv(model, ids, LAYERS), (2, 4, 8), n_query=32)
    env = {**environment(), "command": os.environ.get("LONGATTN_COMMAND")}
    for row in rows:
        writer.write({**row, "model": args.model, **env})
    return rows
