"""Cases run on every rank of a local gloo group (``longattn.distributed.local.run_local``); the
tests check what they return against the single-process float64 oracle in the parent."""

from __future__ import annotations

import dataclasses

import torch

from longattn import from_string
from longattn.distributed import (
    RingRecord,
    lasp2_attention,
    ring_attention,
    shard,
    star_attention,
)
from longattn.methods.dense import Dense
from longattn.testing import make_qkv

HEADS, KV_HEADS, DIM = 4, 2, 16
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class FailsLate(Dense):
    """Causal dense whose element mask raises on queries at or after ``at`` (one rank's shard)."""

    at: int = 30

    def mask(self, b, h, q_pos, kv_pos):
        if bool((q_pos >= self.at).any()):
            raise RuntimeError(f"mask refused query position {int(q_pos.max())}")
        return super().mask(b, h, q_pos, kv_pos)


def inputs(length: int, dtype: str, seed: int = 0):
    return make_qkv(1, HEADS, KV_HEADS, length, head_dim=DIM, dtype=DTYPES[dtype], seed=seed)


def _ring(rank, world, case):
    q, k, v = inputs(case["length"], case["dtype"])
    layout = case["layout"]
    q, k, v = (shard(x, rank, world, layout) for x in (q, k, v))
    bad = case.get("bad")
    if bad and rank == world - 1:  # one rank's input differs from the others'
        if bad == "length":
            q, k, v = q[:, :, 1:], k[:, :, 1:], v[:, :, 1:]
        elif bad == "dtype":
            q, k, v = q.double(), k.double(), v.double()
        elif bad == "heads":
            k, v = k[:, :1], v[:, :1]
    method = FailsLate() if case["method"] == "fails_late" else from_string(case["method"])
    record = RingRecord(count_pairs=True)
    res = ring_attention(q, k, v, method=method, layout=layout, record=record, timeout=30.0)
    return {"out": res.out, "lse": res.lse, "pairs": record.pairs, "blocks": record.blocks,
            "steps": record.steps}  # fmt: skip


def _lasp2(rank, world, case):
    q, k, v = inputs(case["length"], case["dtype"], seed=1)
    q, k, v = (shard(x, rank, world, "contiguous") for x in (q, k, v))
    if case.get("bad") == "nan" and rank == world - 1:
        q = q.clone()
        q[0, 0, -1, 0] = float("inf")
    # the engine's torch path: its C++ path has its own tests, and a build per process is slow
    method = from_string(case["method"])
    res = lasp2_attention(q, k, v, method=method, timeout=30.0, impl="torch")
    return {"out": res.out}


def _star(rank, world, case):
    q, k, v = inputs(case["length"], case["dtype"], seed=2)
    q, k, v = (shard(x, rank, world, "contiguous") for x in (q, k, v))
    n_query = case["n_query"] + (1 if case.get("bad") and rank == world - 1 else 0)
    res = star_attention(q, k, v, n_query=n_query, anchor=case.get("anchor"), timeout=30.0)
    return {"out": res.out, "lse": res.lse}


def tiny_llama(seed: int = 0):
    """A seeded random-init 2-layer Llama (4 query / 2 KV heads, d=16) with its own SDPA."""
    import transformers

    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256, bos_token_id=1,
        eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def prompt(length: int) -> torch.Tensor:
    return torch.randint(3, 128, (1, length), generator=torch.Generator().manual_seed(1))


def _hf(rank, world, case):
    from longattn.integrations.hf_ring import ring_prefill

    ids = shard(prompt(case["length"]), rank, world, case["layout"], dim=1)
    out = ring_prefill(tiny_llama(), ids, case["length"], layout=case["layout"], timeout=30.0)
    cache = out.past_key_values
    return {"logits": out.logits, "cached": [tuple(layer.keys.shape) for layer in cache.layers]}


KINDS = {"ring": _ring, "lasp2": _lasp2, "star": _star, "hf": _hf}


def run_cases(rank: int, world: int, cases: dict[str, dict]) -> dict[str, dict]:
    """Every case on this rank; an exception is recorded as its type and message."""
    results = {}
    for name, case in cases.items():
        try:
            results[name] = {"ok": True, **KINDS[case["kind"]](rank, world, case)}
        except Exception as exc:
            results[name] = {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    return results


def absent_peer(rank: int, world: int) -> dict:
    """The last rank never joins; the others' ring call must fail (its collective times out or
    its peer's connection closes) instead of hanging."""
    if rank == world - 1:
        return {"ok": True, "joined": False}
    q, k, v = (shard(x, rank, world) for x in inputs(37, "float32"))
    try:
        ring_attention(q, k, v, timeout=3.0)
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    return {"ok": True, "joined": True}
