"""Sequence-parallel prefill of a Hugging Face causal LM with ring attention: each rank of a
``torch.distributed`` group runs the model on its shard of the prompt, and every attention layer
runs ``longattn.distributed.ring_attention`` over the whole prompt. Each rank's cache (the model's
own ``DynamicCache``) is left holding its shard's keys and values.

Deviation from the issue's wording: a sibling of ``hf.use`` (whose methods are single-process
rules), registered through the same ``AttentionInterface`` seam. Llama-architecture models (and
any whose attention is plain causal softmax with RoPE by ``position_ids``); no padding.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface

from longattn.distributed import comm
from longattn.distributed.layout import shard_positions
from longattn.distributed.ring import ring_attention
from longattn.integrations.hf import attn_implementation, check_supported
from longattn.methods.dense import Dense

RING_NAME = "longattn_ring"


def _ring_fn(group: Any, layout: str, timeout: float):
    def attend(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        if dropout:
            raise ValueError(f"ring prefill runs inference only (dropout={dropout})")
        res = ring_attention(query, key, value, group=group, method=Dense(), scale=scaling,
                             layout=layout, timeout=timeout)  # fmt: skip
        return res.out.transpose(1, 2).contiguous(), None  # [B, T_r, H, D]

    return attend


@torch.no_grad()
def ring_prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    length: int,
    *,
    group: Any = None,
    layout: str = "contiguous",
    timeout: float = comm.DEFAULT_TIMEOUT_S,
) -> Any:
    """The model's output on this rank's shard ``input_ids`` [B, T_r] of a ``length``-token prompt
    dealt by ``layout``: logits of the shard's tokens and ``past_key_values`` holding the shard."""
    check_supported(model)
    rank, world = comm.rank_world(group)
    positions = shard_positions(length, rank, world, layout)
    if input_ids.dim() != 2 or input_ids.shape[1] != positions.numel():
        raise ValueError(
            f"rank {rank}: input_ids {tuple(input_ids.shape)} is not [B, {positions.numel()}], "
            f"its {layout} shard of {length} tokens over {world} ranks"
        )
    # no mask function is registered: the attention ignores masks (a prompt has no padding here)
    AttentionInterface.register(RING_NAME, _ring_fn(group, layout, timeout))
    with attn_implementation(model, RING_NAME):
        return model(input_ids=input_ids, position_ids=positions[None].expand(len(input_ids), -1))
