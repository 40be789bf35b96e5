"""Method base class, the registry and method construction from strings.

A method is a frozen dataclass that states one idea through one hook (see ``HOOKS``). Kernels, caches and
dispatch belong to the library; a method never calls them.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch

HOOKS = ("mask", "select", "score", "plan", "feature_map", "forward")

_REGISTRY: dict[str, type[Method]] = {}

M = TypeVar("M", bound=type)


class Method:
    """Base of every attention method. Subclasses are frozen dataclasses that override one hook.

    Hooks:
        mask(b, h, q_pos, kv_pos) -> bool tensor   static pattern, FlexAttention ``mask_mod`` signature;
            arguments are broadcastable integer tensors of *original token positions*, so the same
            function serves the materialised reference, the tiled kernel and compiled Flex.
        select(q, view) -> DecodeSelection | None   decode-time, query-aware selection. ``q`` [B, H, Tq, D]
            are the step's queries (Tq <= 16); ``view`` is a ``longattn.types.SelectView`` of one cache
            layer (keys, positions, page min/max/sum maintained at append time, low-dimensional key
            projections, cross-layer state, calibration). Returns, per (batch row, KV head), the pages or
            tokens to attend (``DecodeSelection``), or None for "every key". The selection is shared by
            the group's query heads and the step's queries; causality is applied by the kernel. Scores
            are computed in float32 (so a float64 copy of fp32/bf16 inputs selects the same keys) and
            ties are broken towards the earlier slot. With more than 16 queries (prefill) a select
            method is dense causal attention.
        score(view) -> [B, Hkv, T]                 eviction: the importance of each held key per
            (batch row, KV head), higher = keep; ``view`` is a ``longattn.types.ScoreView``. Score
            methods derive from ``Evict``, whose fields are the library's budget and schedule: the
            library protects sinks and the recent window, takes the per-head top-k under the
            budget policy and frees the rest (``longattn.compress``). A score of +inf keeps a key
            whatever the budget, -inf evicts it whatever the budget. Attention itself is dense
            causal attention over what the cache holds.
        plan(view) -> bool [B, H, nq, nk]          prefill-time dynamic sparsity: the key blocks each
            query block visits, estimated from the call's own queries and keys (``view`` is a
            ``longattn.types.PrefillView``). Plan methods derive from ``SparsePrefill``, whose fields
            are the library's block size, forced blocks and dense fallback (``longattn.prefill``);
            attention is causal attention restricted to the chosen blocks. With few queries
            (decode) a plan method is dense causal attention.
        feature_map(x, view) -> [B, H, T, F]        linear (kernelised) attention: the feature map of
            queries or keys (``view`` is a ``longattn.types.FeatureView``: role, layer, scale,
            calibration). Feature-map methods derive from ``LinearAttention``, whose fields are the
            library's chunking, normalisation, decay and exact window (``longattn.linear``); the
            engine is ``longattn.kernels.linear`` and a cache holds an O(1) recurrent state.
        forward(q, k, v, state, view) -> (out, state)  escape hatch for forms that are not a feature
            map: the method computes its output and its own recurrent state (None at the start)
            and states its float64 definition in ``reference(q, k, v)``.

    Optional, not a hook: ``retain(kv_pos, newest) -> bool | None`` for methods that bound memory:
    which cached keys (by position, [B, T]) any query after position ``newest`` [Bp, 1] may still see.
    With a cache the library evicts the rest after attending.
    """

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        """Field validation of a subclass (``@register`` adds the type checks of every field)."""

    def mask(
        self, b: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, kv_pos: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def select(self, q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def score(self, q: torch.Tensor, k: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def plan(self, view: Any) -> torch.Tensor:
        raise NotImplementedError

    def feature_map(self, x: torch.Tensor, view: Any) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: Any, view: Any
    ) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """A ``forward`` method's definition in one pass (float64 in the tests)."""
        raise NotImplementedError(f"{type(self).__name__} states no reference")

    def retain(self, kv_pos: torch.Tensor, newest: torch.Tensor) -> torch.Tensor | None:
        """Keys later queries may still see (bool, broadcastable to ``kv_pos``); None keeps everything."""
        return None

    @property
    def sink_window(self) -> tuple[int, int] | None:
        """``(sinks, window)`` when ``mask`` is exactly causal attention to the positions below
        ``sinks`` and to the last ``window`` ones (``q - kv < window``) and ``retain`` keeps exactly
        ``kv < sinks or kv > newest + 1 - window``: the library then runs a decode step's mask
        and retention inside its one-call step (``longattn.step``); the tests check the claim
        against both hooks. None: not such a method."""
        return None

    def block_bounds(
        self,
        h: torch.Tensor,
        q_lo: torch.Tensor,
        q_hi: torch.Tensor,
        kv_lo: torch.Tensor,
        kv_hi: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Optional refinement of ``mask`` for block-skipping kernels.

        For tiles whose query positions lie in ``[q_lo, q_hi]`` and key positions in ``[kv_lo, kv_hi]``
        (inclusive, broadcastable integer tensors; ``h`` the query-head index), return ``(any, all)``: a
        tile may contain a visible pair only where ``any`` is true, and every pair is visible where
        ``all`` is true. Both must be *conservative* (``any`` may over-report, ``all`` may under-report);
        the tests check this against the materialised mask. ``None`` means: not available, evaluate the
        mask on the tile instead.
        """
        return None

    @property
    def hook(self) -> str:
        """The hook this method overrides (exactly one)."""
        return _hook_of(type(self))

    @property
    def max_positions(self) -> int | None:
        """Positions must be below this (e.g. a fixed token grid); None means unbounded."""
        return None

    @property
    def is_causal(self) -> bool:
        """Whether the method never lets a query see a later key; kernels use it to skip key ranges
        and diagonal masks. A select or plan method is causal by construction (kernels apply
        causality to its selection). A mask method is taken as non-causal unless it declares ``is_causal``: an
        omission costs speed, never correctness. A declaration is checked against ``mask`` by the
        test suite for every registered method, and on each call's positions by the dispatcher
        before a kernel relies on it (``longattn.api``)."""
        return self.hook in ("select", "plan")

    def describe(self) -> str:
        """``name:field=value,...`` string that ``from_string`` parses back to an equal method."""
        parts = [
            f"{f.name}={_format_value(getattr(self, f.name))}" for f in dataclasses.fields(self)
        ]
        return (self.name or type(self).__name__) + (":" + ",".join(parts) if parts else "")


EVICT_ALLOCATIONS = ("uniform", "pyramid", "ada")
EVICT_WHEN = ("prefill", "chunk", "decode")


@dataclasses.dataclass(frozen=True)
class Evict(Method):
    """Base of the eviction (``score``) methods: the budget and schedule the library applies to any
    scorer, so that every scorer composes with every budget policy.

    budget:     fraction of the tokens seen that each layer keeps, in (0, 1] (1 evicts nothing).
    tokens:     a token count per layer instead (> 0 overrides ``budget``); a budget at or above
                the tokens held evicts nothing.
    allocation: how a layer's budget is shared: ``uniform`` (every layer and head alike),
                ``pyramid`` (PyramidKV: layer budgets decreasing linearly with depth, same total),
                ``ada`` (AdaKV: per-head budgets from the scores, same layer total).
    sinks:      the first positions, always kept.
    recent:     the newest tokens, always kept (they include the tokens being decoded).
    window:     observation window: how many of the latest queries the library keeps for ``score``.
    when:       ``prefill``: once, at the first decode step after a prompt (the question is
                included if it was part of the prompt); ``chunk``: after every prefill call (chunked
                prefill holds at most budget + one chunk); ``decode``: as ``prefill``, then again
                every ``every`` decode steps.
    every:      decode steps between compressions for ``when="decode"``.
    compensate: fold each head's evicted tokens into one compensation token (mean key, mean
                value), which attention weighs by the number of tokens it stands for
                (RazorAttention's, arXiv:2407.15891; ``longattn.cache_summary``); any scorer.
    """

    budget: float = 0.25
    tokens: int = 0
    allocation: str = "uniform"
    sinks: int = 4
    recent: int = 32
    window: int = 32
    when: str = "prefill"
    every: int = 16
    compensate: bool = False

    # what ``score`` reads beyond keys, values and positions: "queries" (the observation window),
    # "accumulated" (accumulated attention and last hit, maintained by the library at every call)
    needs: ClassVar[frozenset[str]] = frozenset({"queries"})

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_fraction(name, budget=self.budget)
        check_non_negative(name, tokens=self.tokens, sinks=self.sinks, recent=self.recent)
        check_positive(name, window=self.window, every=self.every)
        if self.allocation not in EVICT_ALLOCATIONS:
            raise ValueError(
                f"{name}.allocation must be one of {EVICT_ALLOCATIONS}, got {self.allocation!r}"
            )
        if self.when not in EVICT_WHEN:
            raise ValueError(f"{name}.when must be one of {EVICT_WHEN}, got {self.when!r}")
        if self.tokens and self.tokens <= self.sinks + self.recent:
            raise ValueError(
                f"{name}.tokens={self.tokens} must exceed sinks + recent "
                f"({self.sinks} + {self.recent}), which are always kept"
            )

    @property
    def is_causal(self) -> bool:
        return True

    def score(self, view: Any) -> torch.Tensor:  # type: ignore[override]
        raise NotImplementedError

    def key_channels(self, view: Any) -> torch.Tensor | None:
        """Which key channels the layer keeps from its first compression on: int64 [B, Hkv, Dk']
        ascending per (row, KV head) with ``Dk' < D``, or None to keep them all (every scorer
        but ThinK). Read once per layer, on the keys the token eviction kept; not a hook of its
        own: it rides on ``score``'s schedule (``longattn.compress``)."""
        return None


@dataclasses.dataclass(frozen=True)
class SparsePrefill(Method):
    """Base of the dynamic sparse prefill (``plan``) methods: what the library applies to any
    estimator (``longattn.prefill``).

    block_size:  the index block (query and key blocks), in tokens.
    budget:      the estimator's budget, in (0, 1]: the fraction of each query block's causal key
                 blocks (top-k methods) or of its estimated attention mass (top-p methods); 1 plans
                 dense causal attention.
    sink_blocks: the first key blocks, always visited.
    local_blocks: each query block's nearest causal key blocks (its diagonal first), always visited,
                 so every query sees itself.
    dense_below: calls over fewer keys are dense causal attention (SDPA), logged with the reason; so
                 is a call of under one query block or two key blocks.
    last_blocks: the call's last query blocks visit every causal key block (0: none). The end of
                 a prompt (its question or instruction) is what generation reads first; computing
                 it exactly costs ``last_blocks / n`` of an n-block prompt's query blocks, counted
                 in the density.
    """

    block_size: int = 64
    budget: float = 0.2
    sink_blocks: int = 1
    local_blocks: int = 1
    dense_below: int = 0
    last_blocks: int = 0

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_fraction(name, budget=self.budget)
        check_positive(name, block_size=self.block_size, local_blocks=self.local_blocks)
        check_non_negative(name, sink_blocks=self.sink_blocks, dense_below=self.dense_below,
                           last_blocks=self.last_blocks)  # fmt: skip

    @property
    def is_causal(self) -> bool:
        return True

    def plan(self, view: Any) -> torch.Tensor:  # type: ignore[override]
        raise NotImplementedError


LINEAR_DECAYS = ("none", "retnet")


@dataclasses.dataclass(frozen=True)
class LinearAttention(Method):
    """Base of the linear (kernelised) attention methods (``feature_map``): what the library applies
    to any feature map (``longattn.linear``, engine ``longattn.kernels.linear``).

    causal:     each query sees the keys up to its own token (False: every key, for encoders).
    chunk_size: the engine's chunk: quadratic inside a chunk, a carried state between chunks.
    normalize:  divide by ``phi(q) . sum phi(k)`` (the features must then be non-negative); False
                returns the numerator (the model's own norm follows).
    decay:      ``"none"``; ``"retnet"``: a fixed per-KV-head decay ``gamma_h = 1 - 2^(-5-h)``
                (RetNet); or a float in (0, 1] for every head. A key s weighs ``gamma^(t-s)`` at
                query t. Data-dependent gates come from ``gates``.
    window:     keys within ``window`` tokens of the query are attended by exact softmax, the older
                ones by the linear form, under one shared normaliser (BASED, LoLCATs); 0: none.
                Needs ``normalize`` and no data-dependent gate.
    sinks:      the first ``sinks`` tokens stay exact keys of every later query, never folded into
                the linear state (attention sinks, StreamingLLM; a pretrained model's first token
                takes a large share of most heads' attention). Needs a window and no decay.

    ``gates(k, view)`` (optional, not a hook) returns data-dependent ``(log_decay, beta)`` from the
    keys: a per-head or per-channel gate (GLA, Kimi Delta Attention) and the delta rule's writing
    strength (DeltaNet, Gated DeltaNet); the default ``(None, None)`` applies ``decay`` alone.
    """

    causal: bool = True
    chunk_size: int = 64
    normalize: bool = True
    decay: str | float = "none"
    window: int = 0
    sinks: int = 0

    # with normalize, features must be non-negative (the normaliser must not vanish) unless the
    # map's kernel phi(q) . phi(k) is positive by construction (Taylor's 1 + s + s^2 / 2)
    signed_features: ClassVar[bool] = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_positive(name, chunk_size=self.chunk_size)
        check_non_negative(name, window=self.window, sinks=self.sinks)
        if isinstance(self.decay, str):
            if self.decay not in LINEAR_DECAYS:
                raise ValueError(f"{name}.decay must be one of {LINEAR_DECAYS} or a float in "
                                 f"(0, 1], got {self.decay!r}")  # fmt: skip
        else:
            check_fraction(name, decay=self.decay)
        if self.window and not self.normalize:
            raise ValueError(f"{name}.window={self.window} needs normalize=True (the window and "
                             "the linear part share one normaliser)")  # fmt: skip
        if self.window and not self.causal:
            raise ValueError(f"{name}.window={self.window} is a causal sliding window; "
                             "causal=False has none")  # fmt: skip
        if self.sinks and (not self.window or self.decay != "none"):
            raise ValueError(f"{name}.sinks={self.sinks} needs a window (window={self.window}) and "
                             f"decay='none' (decay={self.decay!r}): sinks are exact keys of every "
                             "later query, whatever their age")  # fmt: skip

    @property
    def is_causal(self) -> bool:
        return self.causal

    def feature_map(self, x: torch.Tensor, view: Any) -> torch.Tensor:  # type: ignore[override]
        raise NotImplementedError

    def gates(self, k: torch.Tensor, view: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Data-dependent ``(log_decay, beta)`` from the keys ``k`` [B, Hkv, T, D]: log_decay
        [B, Hkv, T] or [B, Hkv, T, F] (<= 0), beta [B, Hkv, T] in [0, 1] (the delta rule); None
        for either means none (``decay`` still applies)."""
        return None, None


def register(name: str) -> Callable[[M], M]:
    """Class decorator: add a method class to the registry under ``name`` (duplicates are an error)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"method name must be an identifier, got {name!r}")

    def deco(cls: M) -> M:
        if name in _REGISTRY:
            raise ValueError(
                f"method name {name!r} is already registered by {_REGISTRY[name].__qualname__}"
            )
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"@register expects a Method subclass, got {cls!r}")
        cls.name = name
        _check_fields_on_init(cls)
        _REGISTRY[name] = cls
        return cls

    return deco


def _check_fields_on_init(cls: type) -> None:
    """Make construction check every field against its annotation (``bool`` takes only a bool, so
    ``Dense(causal="no")`` is refused rather than truthy) before the class's own ``__post_init__``."""
    own = cls.__post_init__  # its own or inherited validation, run after the type checks

    hints_of: dict[type, dict[str, Any]] = {}  # per class: get_type_hints compiles annotations

    def __post_init__(self) -> None:
        hints = hints_of.get(type(self))
        if hints is None:
            hints = hints_of[type(self)] = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(cls.__name__, f.name, hints.get(f.name), getattr(self, f.name))
        own(self)

    cls.__post_init__ = __post_init__


def _check_type(cls_name: str, key: str, tp: Any, value: Any) -> None:
    """TypeError unless ``value`` fits the plain annotation ``tp`` (bool, int, float, str, a tuple of
    ints, or an Optional of one); other annotations (tensors) are the class's own business."""
    args = typing.get_args(tp)
    if type(None) in args:
        if value is None:
            return
        tp = next(a for a in args if a is not type(None))

    def int_like(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    ok = {
        bool: lambda x: isinstance(x, bool),
        int: int_like,
        float: lambda x: isinstance(x, (int, float)) and not isinstance(x, bool),
        str: lambda x: isinstance(x, str),
    }.get(tp)
    if typing.get_origin(tp) is tuple:
        ok = lambda x: isinstance(x, tuple) and all(map(int_like, x))  # noqa: E731
    if ok is not None and not ok(value):
        want = getattr(tp, "__name__", str(tp))
        raise TypeError(f"{cls_name}.{key} must be {want}, got {value!r} ({type(value).__name__})")


def registry() -> dict[str, type[Method]]:
    """A copy of the registry: name -> method class, in registration order."""
    return dict(_REGISTRY)


def get(name: str) -> type[Method]:
    """The method class registered under ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown method {name!r}; known methods: {known}") from None


def from_string(spec: str) -> Method:
    """Build a method from ``"name"`` or ``"name:field=value,field=value"``.

    Values are parsed by the field's annotated type: int, float, bool (true/false/1/0), str, and tuples of
    int written with ``/`` as separator (``windows=64/128/256``).
    """
    if not isinstance(spec, str):
        raise TypeError(f"method spec must be a str, got {type(spec).__name__}")
    name, _, rest = spec.strip().partition(":")
    cls = get(name.strip())
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq:
            raise ValueError(f"bad parameter {item!r} in {spec!r}: expected field=value")
        if key in kwargs:
            raise ValueError(f"parameter {key!r} is given twice in {spec!r}")
        if key not in fields:
            raise ValueError(
                f"method {name!r} has no parameter {key!r}; parameters: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _parse_value(hints[key], raw.strip(), key, spec)
    return cls(**kwargs)


def _parse_value(tp: Any, raw: str, key: str, spec: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    try:
        if origin in (typing.Union, types.UnionType):
            inner = [a for a in args if a is not type(None)]
            if raw.lower() == "none" and len(inner) < len(args):
                return None
            # numbers before text: "0.9" is a float where ``str | float`` takes either
            for option in sorted(inner, key=lambda a: a is str):
                try:
                    return _parse_value(option, raw, key, spec)
                except ValueError:
                    continue
            raise ValueError(raw)
        if tp is bool:
            if raw.lower() in ("1", "true", "yes"):
                return True
            if raw.lower() in ("0", "false", "no"):
                return False
            raise ValueError(raw)
        if tp is int:
            return int(raw)
        if tp is float:
            return float(raw)
        if tp is str:
            return raw
        if origin is tuple:
            return tuple(int(x) for x in raw.split("/"))  # an empty element is an error
    except ValueError:
        raise ValueError(f"bad value {raw!r} for parameter {key!r} in {spec!r}") from None
    raise TypeError(f"parameter {key!r} of type {tp} cannot be given in a method string")


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return "/".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def check_fraction(cls_name: str, **values: float) -> None:
    """TypeError unless each value is a real number (not a bool); ValueError unless in (0, 1]."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{cls_name}.{key} must be a float, got {value!r}")
        if not 0.0 < value <= 1.0:
            raise ValueError(f"{cls_name}.{key} must be in (0, 1], got {value}")


def check_positive(cls_name: str, **values: int) -> None:
    """Shared validation for ``__post_init__``: each value must be an int > 0."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{cls_name}.{key} must be an int, got {value!r}")
        if value <= 0:
            raise ValueError(f"{cls_name}.{key} must be > 0, got {value}")


def check_non_negative(cls_name: str, **values: int) -> None:
    """Shared validation for ``__post_init__``: each value must be an int >= 0."""
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{cls_name}.{key} must be an int, got {value!r}")
        if value < 0:
            raise ValueError(f"{cls_name}.{key} must be >= 0, got {value}")


def check_budget(cls_name: str, budget: int, fraction: float) -> None:
    """Shared validation of a selection budget: ``budget`` tokens > 0, ``fraction`` in [0, 1]."""
    check_positive(cls_name, budget=budget)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise TypeError(f"{cls_name}.fraction must be a float, got {fraction!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"{cls_name}.fraction must be in [0, 1] (0 = use budget), got {fraction}")


def token_budget(budget: int, fraction: float, n_tokens: int) -> int:
    """Tokens to select: ``ceil(fraction * n_tokens)`` when ``fraction > 0``, else ``budget``."""
    if fraction > 0:
        return max(1, -(-int(fraction * n_tokens * 1e6) // 1_000_000))
    return budget


def top_index(scores: torch.Tensor, k: int, fast: Callable | None = None) -> torch.Tensor:
    """[..., k] indices of the ``k`` largest ``scores`` [..., N] in ascending index order; entries
    whose score is -inf become -1 (and come last). Uses ``torch.topk`` (deterministic on CPU; the
    order among exactly equal scores is torch's), or ``fast(scores, k)`` when given and it does
    not return None (a select hook passes ``view.top_index``: the library's kernel, several times
    faster over 128K tokens). Selections are computed once and shared with the reference."""
    k = min(k, scores.shape[-1])
    if fast is not None:
        picked = fast(scores, k)
        if picked is not None:
            return picked
    picked, order = torch.topk(scores, k, dim=-1, sorted=False)
    order = torch.where(torch.isneginf(picked), scores.shape[-1], order)
    order = torch.sort(order, dim=-1).values
    return torch.where(order == scores.shape[-1], -1, order)


def group_mass(scores: torch.Tensor, visible: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """Softmax mass per key summed over each KV head's query rows.

    scores [B, H, Tq, T] float32 (already scaled); visible broadcastable bool. Returns [B, Hkv, T]
    (-inf on invisible keys, so they are never selected).
    """
    batch, n_heads, q_len, t = scores.shape
    probs = torch.softmax(scores.masked_fill(~visible, -torch.inf), dim=-1).nan_to_num(0.0)
    mass = probs.view(batch, n_kv_heads, -1, t).sum(dim=2)
    any_visible = visible.expand(batch, n_heads, q_len, t).reshape(batch, n_kv_heads, -1, t).any(2)
    return mass.masked_fill(~any_visible, -torch.inf)


def visible_keys(q_pos: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """bool [B, 1, Tq, T]: causal visibility of cached keys by position (-1 slots never)."""
    kp = positions[:, None, None, :]
    qp = q_pos[:, None, :, None]
    return (kp >= 0) & (kp <= qp) & (qp >= 0)


def projected_mass(q: torch.Tensor, view: Any, name: str, matrix: torch.Tensor) -> torch.Tensor:
    """Group softmax mass [B, Hkv, T] of approximate scores ``(q @ M) · (k @ M)`` for M [Hkv, D, r]
    (low-dimensional keys come from the cache, maintained at append time)."""
    batch, n_heads, q_len, dim = q.shape
    n_kv = view.keys.shape[1]
    rows = q.float().reshape(batch, n_kv, -1, dim)  # [B, Hkv, G*Tq, D]
    q_low = rows @ matrix  # [B, Hkv, G*Tq, r]
    k_low = view.project(name, matrix)  # [B, Hkv, T, r]
    q_min = int(view.q_pos.min())
    if view.row_mass is not None and q_min >= 0 and int(view.positions.max()) <= q_min:
        # every stored key is visible to every query (the usual decode step): one fused pass
        return view.row_mass(q_low, k_low, view.positions >= 0, view.scale)
    scores = (q_low @ k_low.float().transpose(-1, -2)) * view.scale
    scores = scores.view(batch, n_heads, q_len, -1)
    return group_mass(scores, visible_keys(view.q_pos, view.positions), n_kv)


@functools.cache
def _hook_of(cls: type) -> str:
    """The one hook ``cls`` overrides (a class does not change after definition: computed once)."""
    found = [h for h in HOOKS if getattr(cls, h) is not getattr(Method, h)]
    if len(found) != 1:
        raise TypeError(f"{cls.__name__} must override exactly one hook of {HOOKS}, got {found}")
    return found[0]
