"""What the evaluation measures: perplexity, density, fidelity on captured activations, KV bytes."""

from __future__ import annotations

import math

import torch

from longattn import attention
from longattn.method import Method, token_budget
from longattn.methods.dense import Dense
from longattn.methods.sla import SLA

# mass recall is measured on the last queries of the sequence: they see the most keys
RECALL_QUERIES = 256


def perplexity(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    """exp(mean next-token negative log-likelihood); logits [1, T, V], input_ids [1, T]."""
    nll = torch.nn.functional.cross_entropy(
        logits[0, :-1].float(), input_ids[0, 1:], reduction="mean"
    )
    return math.exp(nll.item())


def visible(
    method: Method, n_heads: int, q_pos: torch.Tensor, kv_pos: torch.Tensor
) -> torch.Tensor:
    """The method's static pattern as a bool tensor [H, Tq, Tk] (causal part only)."""
    b = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    h = torch.arange(n_heads)[None, :, None, None]
    qp, kp = q_pos[None, None, :, None], kv_pos[None, None, None, :]
    mask = method.mask(b, h, qp, kp) & (kp <= qp)
    return mask.expand(1, n_heads, len(q_pos), len(kv_pos))[0]


# density kinds, as the report labels them
PAIRS = "pairs"  # fraction of causal (query, key) pairs a static pattern visits, in every phase
KV_READ = "kv read/decode step"  # fraction of the cache a select method reads per decode step
KV_KEPT = "kv kept"  # fraction of the cache a budgeted method keeps
PLANNED = "blocks planned"  # realised fraction of causal blocks a plan method visits in prefill
EXACT_BLOCKS = "blocks exact"  # fraction of causal blocks SLA attends exactly (its own kind)


def selected_tokens(method: Method, length: int) -> int | None:
    """Tokens a budgeted method reads or keeps at ``length`` (its ``budget`` or ``fraction``)."""
    budget = getattr(method, "budget", None)
    if budget is None:
        return None
    return min(length, token_budget(int(budget), float(getattr(method, "fraction", 0.0)), length))


def density(method: Method, length: int, n_heads: int = 1, rows: int = 512) -> tuple[float, str]:
    """``(value, kind)``: the fraction of causal (query, key) pairs a static pattern visits
    (``PAIRS``); for a select method the fraction of the cache it reads per decode step
    (``KV_READ``: in prefill it is dense by definition); for another budgeted method the fraction
    of the cache it keeps (``KV_KEPT``); for SLA the fraction of causal key blocks it attends
    exactly (``EXACT_BLOCKS``: its marginal blocks are estimated, the rest skipped). A plan
    method's density depends on its input: NaN here (``plan_facts`` measures it on real text)."""
    if method.hook == "plan":
        return float("nan"), PLANNED
    if isinstance(method, SLA):
        return method.class_shares(length)[0], EXACT_BLOCKS
    if method.hook != "mask":
        tokens = selected_tokens(method, length)
        if tokens is None:
            return float("nan"), "unknown"
        return tokens / length, KV_READ if method.hook == "select" else KV_KEPT
    kv_pos = torch.arange(length)
    seen = 0
    for start in range(0, length, rows):
        q_pos = torch.arange(start, min(length, start + rows))
        seen += int(visible(method, n_heads, q_pos, kv_pos).sum())
    return seen / (n_heads * length * (length + 1) / 2), PAIRS


def kv_budget(method: Method, length: int) -> int:
    """KV tokens a method needs to hold for the last query (its budget for grouping comparisons)."""
    if method.hook == "plan":  # prefill sparsity: every key is kept
        return length
    if method.hook != "mask":
        tokens = selected_tokens(method, length)
        return length if tokens is None else tokens
    q_pos = torch.tensor([length - 1])
    return int(visible(method, 1, q_pos, torch.arange(length)).sum())


def _probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Causal softmax rows of the last ``q.shape[1]`` queries; q [H, Tq, D], k [Hkv, T, D] -> [H, Tq, T]."""
    n_heads, q_len, dim = q.shape
    groups = n_heads // k.shape[0]
    k = k.repeat_interleave(groups, dim=0)  # [H, T, D]; small: one layer, last queries only
    scores = q.float() @ k.float().transpose(1, 2) / math.sqrt(dim)  # [H, Tq, T]
    t = k.shape[1]
    q_pos = torch.arange(t - q_len, t)[:, None]
    scores = scores.masked_fill(torch.arange(t)[None, :] > q_pos, float("-inf"))
    return scores.softmax(-1)


def fidelity(
    method: Method, captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> dict[str, list[float | None]]:
    """Per layer: relative output error ``|out - dense| / |dense|`` and the dense attention mass that
    the method's pattern keeps (mean over heads and the last ``RECALL_QUERIES`` queries)."""
    errors: list[float | None] = []
    recall: list[float | None] = []
    for layer in sorted(captured):
        q, k, v = captured[layer]
        ref = attention(q, k, v, method=Dense()).out
        try:
            out = attention(q, k, v, method=method).out
            errors.append(float((out - ref).norm() / ref.norm()))
        except (ValueError, NotImplementedError):
            errors.append(None)
        if method.hook == "plan":
            recall.append(plan_recall(method, q, k, v))
            continue
        if method.hook != "mask":
            recall.append(None)
            continue
        t = k.shape[2]
        n_q = min(RECALL_QUERIES, t)
        p = _probs(q[0, :, -n_q:], k[0])  # [H, n_q, T]
        seen = visible(method, q.shape[1], torch.arange(t - n_q, t), torch.arange(t))
        recall.append(float((p * seen).sum(-1).mean()))
    return {"layer_error": errors, "mass_recall": recall}


def plan_facts(
    method: Method, captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> tuple[float, float]:
    """(realised density, estimation ms) of a plan method on captured q/k: the fraction of causal
    blocks it plans (``longattn.prefill.density``) averaged over layers, and the time of
    ``longattn.prefill.plan_index`` (estimate + index) summed over layers."""
    import time

    from longattn import prefill
    from longattn.api import make_call

    densities, spent = [], 0.0
    for layer in sorted(captured):
        q, k, v = captured[layer]
        call = make_call(q, k, v, method)
        start = time.perf_counter()
        if prefill.dense_reason(method, q.shape[2], k.shape[2]) is not None:
            densities.append(1.0)  # the library runs it dense
            continue
        index = prefill.plan_index(call)
        spent += time.perf_counter() - start
        densities.append(prefill.density(index, call.derived["plan_view"].causal))
    return sum(densities) / max(1, len(densities)), spent * 1e3


def plan_recall(method: Method, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> float:
    """A plan method's share of the exact attention mass (``PrefillView.block_mass``) in the blocks
    it plans, averaged over heads and query blocks."""
    from longattn import prefill
    from longattn.api import make_call

    if prefill.dense_reason(method, q.shape[2], k.shape[2]) is not None:
        return 1.0
    call = make_call(q, k, v, method)
    chosen = prefill.plan_index(call).layout()[0]  # [Bi, Hi, nq, nk]
    mass = call.derived["plan_view"].block_mass()  # [B, H, nq, nk]
    return float(((mass * chosen).sum(-1) / mass.sum(-1).clamp(min=1e-30)).mean())


def attention_map(q: torch.Tensor, k: torch.Tensor, head: int, size: int) -> torch.Tensor:
    """Dense causal attention probabilities of one head over the first ``size`` tokens [size, size]."""
    groups = q.shape[1] // k.shape[1]
    qh = q[0, head, :size]
    kh = k[0, head // groups, :size]
    return _probs(qh[None], kh[None])[0]


def kv_bytes(cache) -> int | None:
    """Bytes of keys and values in the cache's used slots (``nbytes()`` when it has one, else the
    tensors of its layers, which transformers' dynamic cache sizes to what it holds)."""
    if cache is None:
        return None
    nbytes = getattr(cache, "nbytes", None)
    if callable(nbytes):
        return int(nbytes())
    tensors = _layer_tensors(cache)
    return sum(t.numel() * t.element_size() for t in tensors) if tensors else None


def kv_capacity_bytes(cache) -> int | None:
    """Bytes of memory the cache's storage really holds: ``KVCache.capacity_nbytes()`` (allocated
    slots, positions, page metadata, projections) for a longattn cache, else the storages of its
    layers' key/value tensors."""
    if cache is None:
        return None
    backing = getattr(cache, "kv", cache)
    capacity = getattr(backing, "capacity_nbytes", None)
    if callable(capacity):
        return int(capacity())
    tensors = _layer_tensors(cache)
    return sum(t.untyped_storage().nbytes() for t in tensors) if tensors else None


def _layer_tensors(cache) -> list[torch.Tensor]:
    """The key and value tensors of a transformers cache's layers."""
    found = []
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                found.append(tensor)
    return found
