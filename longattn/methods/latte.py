"""Latte: causal attention through latent vectors with a constant-size recurrent state.

Also the home of what the ``forward`` methods share: the call's scale (``call_scale``), seeded
parameters (``seeded_normal``), a layer's calibration tensor (``layer_tensor``), the check of a
state to resume from (``check_state``) and the rounding model of their ``error_bound``
(``Rounding``, ``magnitude_bound``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from longattn.method import Method, check_positive, register
from longattn.types import EXP_ULPS


class Rounding(NamedTuple):
    """The rounding model of a ``forward`` method's ``error_bound`` (Higham, *Accuracy and
    Stability of Numerical Algorithms*, ch. 3): ``u`` the unit roundoff of the accumulation
    (float32 for float32 and bfloat16 inputs, float64 for float64), ``u_out`` that of the inputs'
    dtype (the output is rounded to it; the inputs are exact in the accumulation dtype), ``eta``
    the relative error of exp and sigmoid, ``gamma(n) = n u / (1 - n u)`` that of an n-term sum
    in any order or split (chunks, blocks, a carried state)."""

    u: float
    u_out: float
    eta: float

    @classmethod
    def of(cls, dtype: torch.dtype) -> Rounding:
        acc = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
        return cls(acc / 2, torch.finfo(dtype).eps / 2, EXP_ULPS * acc)

    def gamma(self, n: float) -> float:
        return n * self.u / (1 - n * self.u)


def abs_scores(x: torch.Tensor, y: torch.Tensor, scale: float) -> float:
    """The largest ``|scale| sum_d |x_id y_jd|`` over rows x [..., n, D] and y [..., m, D]
    (broadcast): a bound on every score's magnitude."""
    if x.numel() == 0 or y.numel() == 0:
        return 0.0
    return abs(scale) * float((x.abs() @ y.abs().transpose(-1, -2)).max())


def magnitude_bound(
    method: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ref: torch.Tensor,
    rho: float, view: Any = None,
) -> torch.Tensor:  # fmt: skip
    """``expm1(rho) (1 + u_out) M + u_out |ref|``, ``M = method.reference(q, k, |v|)``: a form
    whose weights are non-negative, each off by a relative ``rho`` at most (their products of
    relative errors ``(1 + rho_i)`` within ``expm1(sum rho_i)``), is off by ``expm1(rho)`` of the
    sum of |weight x value|, which is its own reference of |v|; then the output's rounding."""
    r = Rounding.of(q.dtype)
    mag = method.reference(q.double(), k.double(), v.double().abs(), view)
    return math.expm1(rho) * (1 + r.u_out) * mag + r.u_out * ref.abs()


def call_scale(view: Any, dim: int) -> float:
    """The softmax scale of the call: ``view.scale`` when the library passes a view, else
    ``1 / sqrt(dim)``."""
    scale = getattr(view, "scale", None) if view is not None else None
    return dim**-0.5 if scale is None else float(scale)


def seeded_normal(shape: tuple[int, ...], seed: int, dtype: torch.dtype) -> torch.Tensor:
    """Standard normal parameters drawn in float32 from ``seed`` and cast to ``dtype``: the float64
    reference and a float32 call use the very same values."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def layer_tensor(
    view: Any, name: str, cls_name: str, shape: tuple[int, ...]
) -> torch.Tensor | None:
    """This layer's calibration tensor ``name`` checked against ``shape``, or None without one."""
    calibration = getattr(view, "calibration", None) if view is not None else None
    if not calibration or name not in calibration:
        return None
    found = calibration[name]
    if tuple(found.shape) != shape:
        raise ValueError(
            f"{cls_name}: calibration tensor {name!r} has shape {tuple(found.shape)}, "
            f"this call needs {shape}"
        )
    return found


def check_state(cls_name: str, state: Any, kind: type, dtype: torch.dtype, **shapes: tuple) -> None:
    """ValueError unless ``state`` (to resume from) is a ``kind`` whose tensors have the given
    shapes (None: any size) and ``dtype`` (the accumulation dtype of this call)."""
    if not isinstance(state, kind):
        raise ValueError(
            f"{cls_name}: cannot resume from a {type(state).__name__}, expected {kind.__name__}"
        )
    for name, want in shapes.items():
        found = getattr(state, name)
        ok = found.dim() == len(want) and all(
            w is None or w == f for w, f in zip(want, found.shape)
        )
        if not ok or found.dtype != dtype:
            raise ValueError(
                f"{cls_name}: state {name} is {tuple(found.shape)} {found.dtype}, this call "
                f"needs {tuple('*' if w is None else w for w in want)} {dtype}"
            )


class LatteState(NamedTuple):
    """Per (batch row, KV head) and latent: the running max of the key-latent logits ``m``
    [B, Hkv, L], the running sum of their exponentials ``z`` [B, Hkv, L] and of the exponentials
    times the values ``u`` [B, Hkv, L, Dv], all relative to ``m`` (an online softmax per latent)."""

    m: torch.Tensor
    z: torch.Tensor
    u: torch.Tensor


@register("latte")
@dataclass(frozen=True)
class Latte(Method):
    """Latent attention: each query reads ``n_latents`` latent summaries of its past.
    Dolga et al. 2023, arXiv:2312.17622.

    With latent vectors ``w_l`` (a layer's calibration tensor ``latents`` [Hkv, L, D], else seeded
    standard normal), a query's distribution over latents ``p(l | t) = softmax_l(scale q_t . w_l)``
    and each latent's causal softmax over keys ``pi_l(s | t) = softmax_{s <= t}(scale k_s . w_l)``:
    ``out_t = sum_l p(l | t) sum_{s <= t} pi_l(s | t) v_s``. The state is one online softmax per
    latent (``LatteState``: O(L Dv) per KV head, whatever the length); a call is evaluated
    chunk by chunk (``chunk_size``), quadratic inside a chunk.
    Deviation from paper: the latent logits come from the call's q and k against shared latent
    vectors instead of Latte's learned projections of the layer input.
    """

    n_latents: int = 64
    chunk_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("Latte", n_latents=self.n_latents, chunk_size=self.chunk_size)

    @property
    def is_causal(self) -> bool:
        return True

    def latents(self, view: Any, n_kv_heads: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """[Hkv, L, D] latent vectors in ``dtype``."""
        shape = (n_kv_heads, self.n_latents, dim)
        found = layer_tensor(view, "latents", "Latte", shape)
        if found is not None:
            return found.to(dtype)
        return seeded_normal((self.n_latents, dim), self.seed, dtype).expand(shape)

    def _logits(self, q, k, view):
        """Query-latent probabilities [B, Hkv, G, T, L] and key-latent logits [B, Hkv, T, L]."""
        batch, n_heads, q_len, dim = q.shape
        n_kv = k.shape[1]
        lat = self.latents(view, n_kv, dim, q.dtype).unsqueeze(0)  # [1, Hkv, L, D]
        scale = call_scale(view, dim)
        rows = q.reshape(batch, n_kv, -1, dim)  # [B, Hkv, G*T, D]
        q_probs = torch.softmax(scale * (rows @ lat.transpose(-1, -2)), dim=-1)
        q_probs = q_probs.view(batch, n_kv, n_heads // n_kv, q_len, -1)
        return q_probs, scale * (k @ lat.transpose(-1, -2))

    def forward(self, q, k, v, state, view=None):
        acc = torch.float64 if v.dtype == torch.float64 else torch.float32
        q, k, vv = (t.to(acc) for t in (q, k, v))
        batch, n_kv, _, dim_v = vv.shape
        q_probs, key_logits = self._logits(q, k, view)
        n_lat = key_logits.shape[-1]
        if state is not None:
            dims = (batch, n_kv, n_lat)
            check_state("Latte", state, LatteState, acc, m=dims, z=dims, u=(*dims, dim_v))
        else:
            m = torch.full((batch, n_kv, n_lat), -torch.inf, dtype=acc)
            state = LatteState(
                m, torch.zeros_like(m), torch.zeros(batch, n_kv, n_lat, dim_v, dtype=acc)
            )
        outs = []
        for lo in range(0, k.shape[2], self.chunk_size):
            hi = min(lo + self.chunk_size, k.shape[2])
            out, state = _latte_chunk(
                q_probs[..., lo:hi, :], key_logits[:, :, lo:hi], vv[:, :, lo:hi], state
            )
            outs.append(out)
        out = torch.cat(outs, dim=3) if outs else q_probs.new_zeros(*q_probs.shape[:4], dim_v)
        return out.reshape(batch, -1, out.shape[3], dim_v).to(v.dtype), state

    def error_bound(self, q, k, v, ref, view=None, calls: int = 1) -> torch.Tensor:
        """What ``forward`` in q's dtype may deviate from ``ref`` (the float64 reference),
        element by element, over ``calls`` chained calls (``Rounding``). Query-latent and
        key-latent logits are dots over D with the latents (exact in the accumulation dtype),
        each off by ``E = (gamma(D) + 5u) A``, A the largest ``|scale| sum |x_d w_d|`` (the dot,
        and two subtractions of a running or chunk max, each ``|a - M| <= 2A``). p(l | t), a
        softmax over L: ``2E_q + 2eta + gamma(L) + u``; each latent's causal softmax over n keys
        (one exp per weight, or two in the factorised chunk form), its sums carried across
        chunks and calls and rescaled by rounded exps that multiply numerator and normaliser
        alike: ``2E_k + 6eta + 4gamma(n + calls) + 3u``; the sum over latents and keys:
        ``gamma(L + n + 2)``. The weights are non-negative: ``magnitude_bound``."""
        r = Rounding.of(q.dtype)
        dim, n_kv = q.shape[-1], k.shape[1]
        scale = call_scale(view, dim)
        lat = self.latents(view, n_kv, dim, torch.float64)  # [Hkv, L, D]
        rows = q.double().reshape(q.shape[0], n_kv, -1, dim)  # [B, Hkv, G*T, D]
        e_q = (r.gamma(dim) + 5 * r.u) * abs_scores(rows, lat, scale)
        e_k = (r.gamma(dim) + 5 * r.u) * abs_scores(k.double(), lat, scale)
        n, n_lat = k.shape[2], lat.shape[1]
        rho = 2 * e_q + 2 * r.eta + r.gamma(n_lat) + r.u
        rho += 2 * e_k + 6 * r.eta + 4 * r.gamma(n + calls) + 3 * r.u + r.gamma(n_lat + n + 2)
        return magnitude_bound(self, q, k, v, ref, rho, view)

    def reference(self, q, k, v, view=None):
        """Float64, one pass, by definition: every latent's causal softmax materialised."""
        q, k, v = (t.to(torch.float64) for t in (q, k, v))
        batch, n_heads, q_len, _ = q.shape
        q_probs, key_logits = self._logits(q, k, view)  # [B, Hkv, G, T, L], [B, Hkv, T, L]
        causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()  # [t, s]
        logits = key_logits.unsqueeze(2).expand(-1, -1, q_len, -1, -1)  # [B, Hkv, t, s, L]
        logits = logits.masked_fill(~causal[..., None], -torch.inf)
        pi = torch.softmax(logits, dim=3)  # over s
        per_latent = torch.einsum("bktsl,bksd->bktld", pi, v)  # [B, Hkv, t, L, Dv]
        out = torch.einsum("bkgtl,bktld->bkgtd", q_probs, per_latent)
        return out.reshape(batch, n_heads, q_len, -1)


# Inside a chunk the weights exp(a_s - M_t) (M_t: query t's running max) factor as
# exp(a_s - M) exp(M - M_t) with M the chunk's max, two matrix products instead of a C x C x L
# tensor, while M - M_t stays below this: exp(64) does not overflow and what exp(a_s - M)
# loses to underflow is below 1e-17 of the normaliser (which is >= 1) in float32.
FACTOR_SPREAD = 64.0


def _latte_chunk(q_probs, logits, v, state):
    """One chunk: q_probs [B, Hkv, G, C, L], logits [B, Hkv, C, L], v [B, Hkv, C, Dv]."""
    running = torch.maximum(state.m.unsqueeze(2), torch.cummax(logits, dim=2).values)  # [B,Hkv,C,L]
    carry = torch.exp(state.m.unsqueeze(2) - running)  # [B, Hkv, C, L]; 0 at the start (m = -inf)
    top = running[:, :, -1:]  # [B, Hkv, 1, L]: the chunk's max
    if float((top - running).max().detach()) < FACTOR_SPREAD:  # a choice of form, no gradient
        lift, within = torch.exp(top - running), torch.exp(logits - top)  # [B, Hkv, C, L]
        z = carry * state.z.unsqueeze(2) + lift * within.cumsum(dim=2)
        coef = q_probs / z.unsqueeze(2)  # [B, Hkv, G, C, L]
        weights = ((coef * lift.unsqueeze(2)) @ within.unsqueeze(2).transpose(-1, -2)).tril()
        last = within  # the newest query's weights: its running max is the chunk's
    else:  # a wide spread: each query's weights relative to its own running max
        size = logits.shape[2]
        causal = torch.ones(size, size, dtype=torch.bool).tril()[..., None]  # [t, s, 1]
        diff = logits.unsqueeze(2) - running.unsqueeze(3)  # [B, Hkv, t, s, L]
        full = torch.exp(diff.masked_fill(~causal, -torch.inf))
        z = carry * state.z.unsqueeze(2) + full.sum(dim=3)  # [B, Hkv, C, L]
        coef = q_probs / z.unsqueeze(2)
        weights = torch.einsum("bkgtl,bktsl->bkgts", coef, full)
        last = full[:, :, -1]  # [B, Hkv, s, L]
    out = (coef * carry.unsqueeze(2)) @ state.u.unsqueeze(2)  # [B, Hkv, G, C, Dv]
    out = out + weights @ v.unsqueeze(2)
    u = carry[:, :, -1, :, None] * state.u + torch.einsum("bksl,bksd->bkld", last, v)
    return out, LatteState(running[:, :, -1], z[:, :, -1], u)
