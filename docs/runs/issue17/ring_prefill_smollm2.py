"""Sequence-parallel prefill of the embedded SmolLM2-135M with ring attention, checked against one
process: every rank runs the model on its shard of a real-text prompt, rank 0 gathers the logits
and compares them with the model's own single-process sdpa forward.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 docs/runs/issue17/ring_prefill_smollm2.py \
        --length 1024 --layout zigzag
"""

from __future__ import annotations

import argparse
import datetime
import json
import time

import torch
import torch.distributed as dist

from longattn.distributed.layout import shard, unshard
from longattn.eval import tasks
from longattn.eval.models import load
from longattn.integrations.hf_ring import ring_prefill


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--layout", default="zigzag")
    args = parser.parse_args()
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=300))
    rank, world = dist.get_rank(), dist.get_world_size()
    model, tokenizer = load("smollm2-135m")
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", args.length, 1)])
    part = shard(ids, rank, world, args.layout, dim=1)
    start = time.perf_counter()
    out = ring_prefill(model, part, args.length, layout=args.layout)
    seconds = time.perf_counter() - start
    held = [tuple(layer.keys.shape) for layer in out.past_key_values.layers]
    gathered = [None] * world
    dist.all_gather_object(gathered, (out.logits, seconds, held[0]))
    if rank == 0:
        logits = unshard([g[0] for g in gathered], args.layout, dim=1)
        with torch.no_grad():
            start = time.perf_counter()
            alone = model(input_ids=ids, use_cache=False).logits
            one = time.perf_counter() - start
        diff = (logits - alone).abs().max().item()
        same = (logits.argmax(-1) == alone.argmax(-1)).float().mean().item()
        print(json.dumps({"world": world, "layout": args.layout, "length": args.length,
                          "max_abs_logit_diff": diff, "logit_scale": alone.abs().max().item(),
                          "same_argmax": same, "rank_s": [g[1] for g in gathered],
                          "one_process_s": one, "cache_shapes": [g[2] for g in gathered],
                          "threads": torch.get_num_threads()}))  # fmt: skip
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
