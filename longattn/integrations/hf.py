"""Hugging Face transformers integration: the only module of longattn that imports transformers.

Everything goes through transformers' documented seams (``AttentionInterface``,
``set_attn_implementation``); no module's ``forward`` is ever replaced.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

CAPTURE_NAME = "longattn_capture"


def load_pretrained(
    folder: str, gguf_file: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[torch.nn.Module, object]:
    """Load a causal LM and its tokenizer from a local folder (optionally a GGUF file in it), offline."""
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, local_files_only=True, **kwargs
    )
    model.eval()
    return model, tokenizer


@contextlib.contextmanager
def attn_implementation(model: torch.nn.Module, name: str) -> Iterator[torch.nn.Module]:
    """Switch ``model`` to the registered attention implementation ``name``; restore it on exit."""
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield model
    finally:
        model.set_attn_implementation(previous)


@torch.no_grad()
def capture_qkv(
    model: torch.nn.Module, input_ids: torch.Tensor, layers: list[int] | None = None
) -> dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run one forward pass and return the post-RoPE ``(q, k, v)`` of each layer (or of ``layers``).

    q [B, H, T, D] and k, v [B, Hkv, T, D] exactly as the model's attention receives them; the pass
    itself is computed by transformers' own SDPA attention, so the model's output is unchanged.
    """
    captured: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    wanted = None if layers is None else set(layers)

    def record(module, query, key, value, attention_mask, **kwargs):
        layer = module.layer_idx
        if wanted is None or layer in wanted:
            captured[layer] = (query.detach().clone(), key.detach().clone(), value.detach().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE_NAME, record)
    AttentionMaskInterface.register(CAPTURE_NAME, sdpa_mask)
    with attn_implementation(model, CAPTURE_NAME):
        model(input_ids=input_ids, use_cache=False)
    return captured
