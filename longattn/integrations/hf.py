"""Hugging Face transformers integration (with ``hf_gates``, the only modules importing transformers).

Everything goes through transformers' documented seams (``AttentionInterface``,
``set_attn_implementation``); no module's ``forward`` is ever replaced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from longattn.api import attention
from longattn.cache import KVCache
from longattn.integrations.rope import Corrections, RopeFrame, place_sinks
from longattn.method import Method, from_string
from longattn.methods.dense import Dense
from longattn.methods.infini_attention import InfiniAttention
from longattn.methods.intersection import Intersection
from longattn.methods.sliding_window import SlidingWindow
from longattn.methods.streaming_llm import StreamingLLM
from longattn.types import recurrent_state_nbytes

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


def with_cache(model: torch.nn.Module, cache: object) -> dict[str, object]:
    """The keyword argument that hands ``cache`` to ``model(...)``: ``cache`` where the model's
    forward takes it by that name (transformers 5.x renamed ``past_key_values``, which it
    accepts with a deprecation warning until 5.40), ``past_key_values`` before."""
    return {_cache_keyword(type(model)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    """Per model class (a decode loop asks once per step)."""
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def returned_cache(out: object) -> object:
    """The cache a model's output carries (``out.cache``, or ``out.past_key_values`` before the
    rename), without the deprecated alias's warning."""
    names = {field.name for field in dataclasses.fields(out)}
    return out.cache if "cache" in names else out.past_key_values


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


# Architectures whose attention goes through ``AttentionInterface`` with plain causal softmax semantics
# (scaling, GQA and an optional per-layer sliding window are honoured). ``model_type`` -> family name.
SUPPORTED = {
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma3_text": "Gemma 3",
    "phi3": "Phi-3",
}

_names = itertools.count()


@dataclass(frozen=True)
class TokenPositions:
    """What ``use()``'s mask function hands the attention function in place of a 4-D mask.

    q [B, Tq] and kv [B, Tk]: each slot's original position among the row's real tokens (so a left-padded
    row counts from its first real token, and StreamingLLM's sinks are its first real tokens); -1 marks
    a padding slot. ``default`` is true when there is no padding and the queries are the last Tq of keys
    that start at position 0, i.e. ``attention()`` may use its default positions (and the SDPA path);
    ``q_start`` is the first query's position then.
    """

    q: torch.Tensor
    kv: torch.Tensor
    default: bool
    q_start: int = 0


def positions_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    attention_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    config=None,
    **kwargs,
) -> TokenPositions:
    """``AttentionMaskInterface`` entry: per-row token positions from the 2-D padding mask.

    transformers calls it once per forward and per layer type (full / sliding) with the cache's mask
    sizes; ``attention_mask`` is the 2-D padding mask over every token seen so far, or None.
    """
    q_offset, kv_offset = int(q_offset), int(kv_offset)
    total = max(q_offset + q_length, kv_offset + kv_length)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and q_offset + q_length > limit:
        raise ValueError(
            f"{q_offset + q_length} tokens exceed the model's {limit} positions "
            "(max_position_embeddings); longattn does not extend a model's positions"
        )
    if attention_mask is None or bool(attention_mask.all()):
        seen = torch.arange(total, device=device).expand(batch_size, total)
        padded = False
    else:
        real = attention_mask.to(device=device, dtype=torch.bool)
        if real.shape[-1] < total:
            raise ValueError(
                f"the 2-D attention_mask covers {real.shape[-1]} tokens, the cache and input {total}"
            )
        real = real[:, :total]
        seen = torch.where(real, real.long().cumsum(-1) - 1, -1)  # [B, total]
        padded = True
    default = not padded and kv_offset == 0 and q_offset + q_length == kv_length
    return TokenPositions(
        seen[:, q_offset : q_offset + q_length],
        seen[:, kv_offset : kv_offset + kv_length],
        default,
        q_offset,
    )


def positions_mask_unbounded(*args, config=None, **kwargs) -> TokenPositions:
    """``positions_mask`` without the ``max_position_embeddings`` limit: StreamingLLM with
    ``positions="cache"`` keeps every query-key distance below sinks + window + the call's tokens,
    InfiniAttention with ``positions="segment"`` every rotary position below its segment."""
    return positions_mask(*args, **kwargs)


def _architecture(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return f"{type(model).__name__} (model_type={getattr(config, 'model_type', None)!r})"


def check_supported(model: torch.nn.Module) -> None:
    """Refuse, naming the architecture and the feature, a model whose attention a method cannot honour."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"use() needs a transformers PreTrainedModel, got {type(model).__name__}")
    arch = _architecture(model)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise ValueError(
            f"{arch} uses attention logit soft-capping (attn_logit_softcapping="
            f"{config.attn_logit_softcapping}), which longattn's kernels do not compute"
        )
    if config.model_type not in SUPPORTED:
        known = ", ".join(f"{v} ({k})" for k, v in SUPPORTED.items())
        raise ValueError(f"{arch} is not a supported architecture; supported: {known}")
    if not getattr(config, "is_causal", True):
        raise ValueError(f"{arch} is configured for non-causal attention, which use() refuses")


def _layer_method(method: Method, window: int | None, max_q_pos: int) -> Method:
    """``method`` restricted to the layer's own sliding window (``q - k < window``), if it matters."""
    if window is None or max_q_pos < window:  # every visible key is within the window already
        return method
    own = SlidingWindow(window=int(window))
    if (isinstance(method, Dense) and method.causal) or method.hook == "score":
        # an eviction method attends densely: in a windowed layer the window alone is what it
        # attends, and the window's retention already bounds that layer's memory
        return own
    return Intersection(method, own)


def _check_call(module: torch.nn.Module, arch: str, dropout: float, kwargs: dict) -> None:
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{arch}: attention soft-capping (softcap={kwargs['softcap']}) is refused")
    if kwargs.get("s_aux") is not None or getattr(module, "sinks", None) is not None:
        raise ValueError(f"{arch}: learned attention-sink logits (s_aux / sinks) are refused")
    if kwargs.get("position_bias") is not None:
        raise ValueError(f"{arch}: additive attention biases (position_bias) are refused")
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise ValueError(f"{arch}: non-causal attention in layer {module.layer_idx} is refused")
    if dropout:
        raise ValueError(f"{arch}: attention dropout ({dropout}) is refused; call model.eval()")


class KVCacheLayer(CacheLayerMixin):
    """One model layer of a ``LongattnCache``, in transformers' per-layer cache protocol.

    ``update`` stores nothing: it marks the new keys and values as pending and returns them; the
    attention function then hands them to ``attention(..., cache=kv, layer=...)``, which appends them
    to the ``KVCache``, attends over what it holds and applies the method's retention.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, owner: LongattnCache, layer: int):
        super().__init__()
        self.owner, self.layer = owner, layer
        self.pending: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.owner.is_open:
            raise RuntimeError(
                "this cache belongs to a longattn.hf.use() block that has ended; "
                "pass it to the model only inside that block"
            )
        self.is_initialized = True
        self.pending = key_states
        return key_states, value_states

    def take_pending(self, key_states: torch.Tensor) -> bool:
        """Whether ``key_states`` are the new tokens this layer just received (and forget them)."""
        mine = self.pending is key_states
        self.pending = None
        return mine

    def get_seq_length(self) -> int:
        return self.owner.kv.n_seen(self.layer)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.kv.seq_len(self.layer) + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.pending = None


class LongattnCache(Cache):
    """A transformers ``Cache`` whose storage is a ``longattn.KVCache`` (``.kv``).

    Keys are kept, evicted or selected by the method of the ``use()`` block that made it, so memory
    follows the method (StreamingLLM keeps sinks + window). ``kv.seq_len(layer)`` is what a layer holds,
    ``get_seq_length()`` the tokens seen.
    """

    def __init__(self, n_layers: int):
        self.kv = KVCache(n_layers)
        self.is_open = True
        super().__init__(layers=[KVCacheLayer(self, i) for i in range(n_layers)])

    def reset(self) -> None:
        self.kv.reset()
        super().reset()

    def nbytes(self) -> int:
        """Bytes of keys and values in the backing ``KVCache``'s used slots, plus the recurrent
        states of state-carrying methods (SLA, Infini-attention, linear attention): all in use."""
        return self.kv.nbytes() + recurrent_state_nbytes(self.kv.state)

    def capacity_nbytes(self) -> int:
        """Bytes the backing ``KVCache`` really holds (allocated storage and metadata)."""
        return self.kv.capacity_nbytes()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("LongattnCache does not support beam search")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("LongattnCache cannot be cropped (assisted decoding)")


def make_attention_fn(
    method: Method, arch: str, cache: LongattnCache, frame: RopeFrame | None = None
):
    """The ``AttentionInterface`` function that runs ``attention(..., method)`` inside the model.

    When the keys are the new tokens of ``cache`` (the model was given it as ``past_key_values``) the
    call goes through the ``KVCache``; otherwise (no cache, or transformers' own) ``key`` and ``value``
    already hold every visible token. With a ``frame`` (StreamingLLM ``positions="cache"``,
    InfiniAttention ``positions="segment"``) queries and keys are re-rotated in it
    (``longattn.integrations.rope``), by a rotation built once per forward.
    """
    segment = method.segment if isinstance(method, InfiniAttention) else None
    corrections = Corrections(frame, wrap=segment) if frame is not None else None

    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        _check_call(module, arch, dropout, kwargs)
        pos = attention_mask
        if not isinstance(pos, TokenPositions):
            raise ValueError(
                f"{arch}: expected longattn's TokenPositions as attention_mask, got "
                f"{type(pos).__name__} (pass a 2-D attention_mask, not a prepared 4-D mask)"
            )
        window = kwargs.get("sliding_window")
        layer = module.layer_idx
        # the keys are the new tokens of our cache: attend through the KVCache, which appends them
        through_cache = layer < len(cache.layers) and cache.layers[layer].take_pending(key)
        if not through_cache and (
            pos.kv.shape[-1] != key.shape[2] or pos.q.shape[-1] != query.shape[2]
        ):
            raise ValueError(
                f"{arch}: positions for {pos.q.shape[-1]} queries / {pos.kv.shape[-1]} keys, "
                f"got q {tuple(query.shape)} and k {tuple(key.shape)}"
            )
        if frame is not None:
            query, key = _rotary_frame(
                corrections, arch, through_cache, pos, query, key, kwargs, segment is not None
            )
        if not through_cache and pos.default:
            layer_method = _layer_method(method, window, key.shape[2] - 1)
            # Dense with default positions is exactly what PyTorch's fused kernel computes.
            impl = "sdpa" if isinstance(layer_method, Dense) else "auto"
            res = attention(query, key, value, method=layer_method, layer=layer, scale=scaling,
                            impl=impl)  # fmt: skip
        elif through_cache and pos.default and _continues(cache.kv, layer, pos.q_start):
            # the new tokens continue a layer holding 0..n-1 in every row: default positions
            res = attention(
                query,
                key,
                value,
                method=_layer_method(method, window, pos.q_start + query.shape[2] - 1),
                cache=cache.kv,
                layer=layer,
                scale=scaling,
            )
        else:
            top = int(pos.q.max()) if window is not None else 0  # the window's reach only
            res = attention(
                query,
                key,
                value,
                method=_layer_method(method, window, top),
                cache=cache.kv if through_cache else None,
                layer=layer,
                scale=scaling,
                q_positions=pos.q,
                # through the cache the new tokens are the queries; else the keys have their own
                kv_positions=pos.q if through_cache else pos.kv,
            )
        if frame is not None and segment is None:  # StreamingLLM's cache frame
            place_sinks(cache.kv, layer, method.sinks, method.window, frame)
        return res.out.transpose(1, 2).contiguous(), None  # [B, Tq, H, D]

    return attend


def _rotary_frame(corrections, arch, through_cache, pos, query, key, kwargs, segment: bool):
    """Queries and new keys re-rotated with float64 angles: at their original positions
    (StreamingLLM's ``positions="cache"`` frame; its sinks are placed after the call), or at their
    offsets inside their segment (InfiniAttention's ``positions="segment"``)."""
    policy = "InfiniAttention positions='segment'" if segment else "StreamingLLM positions='cache'"
    # without the cache, the keys must be the queries' own tokens (one whole-sequence forward)
    own_tokens = segment and pos.default and query.shape[2] == key.shape[2]
    if not through_cache and not own_tokens:
        raise ValueError(
            f"{arch}: {policy} needs the use() block's cache: pass it to the model as its "
            "cache / past_key_values"
        )
    model_pos = kwargs.get("position_ids")
    if model_pos is None or not pos.default and corrections.padded(pos.q):
        raise ValueError(
            f"{arch}: {policy} needs unpadded rows and the model's position_ids in its "
            "attention call"
        )
    q_turn = corrections(model_pos, pos.q, query.dtype)
    return q_turn.apply(query), corrections(model_pos, pos.q, key.dtype).apply(key)


def _asks_frame(method: Method) -> bool:
    """Whether ``method`` or a method inside it (a wrapper's fields) asks for a rotary frame:
    StreamingLLM ``positions="cache"`` or InfiniAttention ``positions="segment"``."""
    if getattr(method, "positions", None) in ("cache", "segment"):
        return True
    inner = [getattr(method, f.name) for f in dataclasses.fields(method)]
    inner += [m for value in inner if isinstance(value, tuple) for m in value]
    return any(isinstance(m, Method) and _asks_frame(m) for m in inner)


def _position_frame(model: torch.nn.Module, method: Method) -> RopeFrame | None:
    """The rotary frame of StreamingLLM ``positions="cache"`` or InfiniAttention
    ``positions="segment"`` (None for original positions); ``ValueError`` for such a policy on a
    wrapped method or on a RoPE it cannot re-rotate."""
    if not _asks_frame(method):
        return None
    arch = _architecture(model)
    if not isinstance(method, (StreamingLLM, InfiniAttention)):
        raise ValueError(
            f"positions='cache' / 'segment' are StreamingLLM's / InfiniAttention's own policies; "
            f"{method.describe()!r} is neither (use the method itself, not wrapped or combined)"
        )
    rotaries = [m for m in model.modules() if hasattr(m, "inv_freq")]
    if len(rotaries) != 1:
        raise ValueError(
            f"{arch}: positions={method.positions!r} needs one rotary embedding, found "
            f"{len(rotaries)}"
        )
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return RopeFrame.from_rotary(rotaries[0], head_dim, arch)


def _continues(kv: KVCache, layer: int, start: int) -> bool:
    """Whether tokens at positions ``start..`` are the next ones of ``layer`` in every row, so that
    ``attention()``'s default cache positions are theirs."""
    return kv.is_dense(layer) and kv.seq_len(layer) == start


def _check_segment(model: torch.nn.Module, method: Method) -> None:
    """InfiniAttention's segment must fit the model's positions (its local softmax spans one)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(method, InfiniAttention) and limit is not None and method.segment > limit:
        raise ValueError(
            f"InfiniAttention.segment={method.segment} is longer than {_architecture(model)}'s "
            f"{limit} positions (max_position_embeddings)"
        )


@contextlib.contextmanager
def use(model: torch.nn.Module, method: Method | str = "dense") -> Iterator[LongattnCache]:
    """Run ``model``'s attention through ``longattn.attention`` under ``method``; restore it on exit.

    Registers an attention function (``AttentionInterface``) and its mask function
    (``AttentionMaskInterface``, which hands per-row positions derived from the padding mask to the
    attention function), switches the model to them, and yields a ``LongattnCache`` (a transformers
    ``Cache`` backed by a ``KVCache``) to pass as ``past_key_values`` to ``model(...)`` or
    ``model.generate(...)``. Without it the model runs with transformers' own cache, where the method
    changes compute but not memory. With grad mode on (training, or a forward outside
    ``torch.no_grad()``) each layer runs on an implementation with a backward (for a sparse method
    the materialising reference, within its memory cap) and the yielded cache refuses the call:
    train with ``use_cache=False``, generate under ``torch.no_grad()``. On exit (also on an
    exception) the model's previous attention implementation is set back, both registrations are
    removed and the cache is closed.

    Refused with ``ValueError`` naming the architecture: unsupported architectures, attention logit
    soft-capping, learned sink logits, non-causal attention, an InfiniAttention segment longer than
    the model's positions, dropout in training mode, and inputs longer than
    ``config.max_position_embeddings`` (except under StreamingLLM ``positions="cache"``, whose
    positions stay inside the cache, and InfiniAttention ``positions="segment"``, whose positions
    stay inside a segment: they need unpadded rows, the use() block's cache (InfiniAttention also
    runs one whole-sequence forward without it) and a Llama-style RoPE with fixed frequencies, and
    are refused on other methods).
    """
    if isinstance(method, str):
        method = from_string(method)
    elif not isinstance(method, Method):
        raise TypeError(f"method must be a Method or a method string, got {type(method).__name__}")
    check_supported(model)
    if not method.is_causal:
        raise ValueError(
            f"method {method.describe()!r} lets queries see later keys; {_architecture(model)} "
            "is a causal decoder"
        )
    _check_segment(model, method)
    frame = _position_frame(model, method)
    cache = LongattnCache(model.config.num_hidden_layers)
    name = f"longattn_{next(_names)}"
    attend = make_attention_fn(method, _architecture(model), cache, frame)
    AttentionInterface.register(name, attend)
    AttentionMaskInterface.register(name, positions_mask_unbounded if frame else positions_mask)
    try:
        with attn_implementation(model, name):
            yield cache
    finally:
        cache.is_open = False
        # transformers has no unregister; the global mappings are plain dicts.
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
