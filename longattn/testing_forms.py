"""Derived rounding-error bounds of the ``forward`` methods (latent, low-rank and recurrent forms)
against their own float64 ``reference``, for tests and the linear contract
(``longattn.testing.assert_linear_method_close``).

The bounds (``bound_*``) are first-order rounding-error models (Higham, *Accuracy and Stability
of Numerical Algorithms*, ch. 3), in the notation of ``longattn.testing.reference_bound``: ``u``
the unit roundoff of the accumulation (float32 for float32 and bfloat16 inputs, float64 for
float64), ``u_out`` that of the inputs' dtype (the output is rounded to it; the inputs themselves
are exact in the accumulation dtype), ``gamma(n) = n u / (1 - n u)`` for any n-term sum in any
order or split (chunks, a carried state), ``eta = EXP_ULPS eps`` the relative error of exp (and of
sigmoid = 1 / (1 + exp)). A weight built from a score with absolute error E is off by a factor
within exp(+-E); a ratio of such sums (a normalised weight) by exp(+-2E). Relative errors of
positive factors multiply, so a product of factors (1 + rho_i) is within ``expm1(sum rho_i)``.
Every form here except SOFT has non-negative weights, so its magnitude, the sum of |weight x
value|, is the method's own reference applied to |v|. No constant is fitted to an implementation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from longattn.methods.aaren import Aaren
from longattn.methods.agent_attention import AgentAttention, pool_tokens
from longattn.methods.flowformer import CLAMP, Flowformer
from longattn.methods.latte import Latte
from longattn.methods.mega import Mega, damped_ema
from longattn.methods.soft import SOFT
from longattn.methods.sse import SSE
from longattn.testing import EXP_ULPS, reference_bound
from longattn.types import accumulation_dtype


class View(NamedTuple):
    """What a ``forward`` method reads from the library's view: the call's scale and the layer's
    calibration tensors."""

    scale: float
    calibration: dict[str, torch.Tensor] | None = None


class Rounding(NamedTuple):
    u: float
    u_out: float
    eta: float

    def gamma(self, n: float) -> float:
        return n * self.u / (1 - n * self.u)


def rounding(dtype: torch.dtype) -> Rounding:
    acc = torch.finfo(accumulation_dtype(dtype)).eps
    return Rounding(acc / 2, torch.finfo(dtype).eps / 2, EXP_ULPS * acc)


def _abs_scores(x: torch.Tensor, y: torch.Tensor, scale: float) -> float:
    """max_ij |scale| sum_d |x_id y_jd| over rows x [..., n, D], y [..., m, D] (broadcast)."""
    if x.numel() == 0 or y.numel() == 0:
        return 0.0
    return abs(scale) * float((x.abs() @ y.abs().transpose(-1, -2)).max())


def _grouped(q: torch.Tensor, n_kv: int) -> torch.Tensor:
    return q.reshape(q.shape[0], n_kv, -1, q.shape[-1])  # [B, Hkv, G*T, D]


def _magnitude_bound(method, q, k, v, rho: float, r: Rounding, view=None):
    """``expm1(rho) (1 + u_out) reference(|v|) + u_out |ref|``: a relative weight error rho on
    non-negative weights, then the rounding of the (perturbed) output to its dtype."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref = method.reference(q64, k64, v64, view)
    mag = method.reference(q64, k64, v64.abs(), view)
    return ref, math.expm1(rho) * (1 + r.u_out) * mag + r.u_out * ref.abs()


def bound_latte(method: Latte, q, k, v, view=None, n_calls: int = 1):
    """Latte. Query-latent logits and key-latent logits are dot products over D with the
    latents (exact in the accumulation dtype): each off by ``E = (gamma(D) + 5u) A`` with A the
    largest ``|scale| sum |x_d w_d|`` (the dot, its rounding, and two subtractions of a running
    or chunk max, each |a - M| <= 2A). p(l | t) is a softmax over L: ``2E_q + 2eta + gamma(L) +
    u``; each latent's causal softmax over n keys (a weight is one exp, or the product of two in
    the factorised chunk form), its running sums carried across chunks and calls, rescaled by
    rounded exps that multiply numerator and normaliser alike: ``2E_k + 6eta + 4gamma(n) + 3u``;
    the sum over latents and keys adds ``gamma(L + n + 2)``."""
    r = rounding(q.dtype)
    q64, k64 = q.double(), k.double()
    dim, scale = q.shape[-1], (view.scale if view else q.shape[-1] ** -0.5)
    lat = method.latents(view, k.shape[1], dim, torch.float64)  # [Hkv, L, D]
    e_q = (r.gamma(dim) + 5 * r.u) * _abs_scores(_grouped(q64, k.shape[1]), lat, scale)
    e_k = (r.gamma(dim) + 5 * r.u) * _abs_scores(k64, lat, scale)
    n, n_lat = k.shape[2], lat.shape[1]
    rho = 2 * e_q + 2 * r.eta + r.gamma(n_lat) + r.u
    rho += 2 * e_k + 6 * r.eta + 4 * r.gamma(n + n_calls) + 3 * r.u + r.gamma(n_lat + n + 2)
    return _magnitude_bound(method, q, k, v, rho, r, view)


def bound_aaren(method: Aaren, q, k, v, view=None, n_calls: int = 1):
    """Aaren is causal softmax attention (of its fixed query, or the call's): the library's
    ``reference_bound`` of the same attention. The scan's combine rescales numerator and
    normaliser by one rounded exp (cancels up to the products' roundings, <= log2(n) <= n per
    term, counted in its gamma(n))."""
    scale = view.scale if view else q.shape[-1] ** -0.5
    if method.query == "fixed":
        fixed = method.fixed_query(view, q.shape[1], q.shape[-1], torch.float32)
        q = fixed[None, :, None].expand_as(q).to(q.dtype)
    causal = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    found = reference_bound(q, k, v, causal, scale)
    return found.ref.out, found.out


def bound_mega(method: Mega, q, k, v, view=None, n_calls: int = 1):
    """Mega. The EMA's coefficients are computed in float64 and rounded once (u); a piece of at
    most C = chunk_size tokens sums <= C + h + 1 non-negative-coefficient terms (``gamma(C + h +
    2)`` with the coefficient's rounding), and the state carried over the pieces (at most
    T // C + 2 per call) is decayed by a rounded power and added once per piece (3u each, on
    the old terms only): the smoothed x is within ``rho_ema EMA(|x|)``,
    ``rho_ema = gamma(C + h + 2) + u + 3u (T // C + 2 n_calls + 1)``. A score
    ``scale q . k~`` is then off by ``E = (rho_ema + gamma(D) + 3u) A``, A the largest
    ``|scale| sum |q_d| EMA(|k|)_d``; the chunk softmax by ``2E + 4eta + 3gamma(C) + 2u``
    relative; the values by rho_ema relative to EMA(|v|). The gate's logit is off by
    ``E_g = (gamma(D) + u) A_g``, the gate by at most ``E_g / 4 + eta + 2u`` absolute; it
    multiplies the attention and the smoothed value, each at most their magnitude M_attn =
    (ungated reference of |v|) and M_self = EMA(|v|)_t."""
    r = rounding(q.dtype)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    n_kv, dim, length = k.shape[1], q.shape[-1], k.shape[2]
    scale = view.scale if view else dim**-0.5
    size = method.chunk_size
    pieces = length // size + 2 * n_calls + 1
    rho_ema = r.gamma(size + method.n_dims + 2) + r.u + 3 * r.u * pieces
    k_mag = damped_ema(k64.abs(), method.ema_params(view, n_kv, dim, ""))
    e_w = (rho_ema + r.gamma(dim) + 3 * r.u) * _abs_scores(_grouped(q64, n_kv), k_mag, scale)
    rho_w = math.expm1(2 * e_w + 4 * r.eta + 3 * r.gamma(size) + 2 * r.u)
    ungated = Mega(method.chunk_size, method.n_dims, False, method.seed)
    ref = method.reference(q64, k64, v64, view)
    m_attn = ungated.reference(q64, k64, v64.abs(), view)
    if not method.gated:
        return ref, (rho_w + 2 * rho_ema + r.u) * (1 + r.u_out) * m_attn + r.u_out * ref.abs()
    gate = method.gate_vector(view, q.shape[1], dim, torch.float64)  # [H, D]
    e_g = (r.gamma(dim) + r.u) * abs(scale) * float((q64.abs() @ gate.abs()[..., None]).max())
    v_mag = damped_ema(v64.abs(), method.ema_params(view, n_kv, v.shape[-1], "v_"))
    m_self = v_mag.repeat_interleave(q.shape[1] // n_kv, 1)
    rho = e_g / 4 + r.eta + 2 * r.u + rho_w + 2 * rho_ema + 3 * r.u
    return ref, rho * (1 + r.u_out) * (m_attn + m_self) + r.u_out * ref.abs()


def bound_agent(method: AgentAttention, q, k, v, view=None, n_calls: int = 1):
    """AgentAttention. An agent is a mean of at most T queries: off by ``gamma(T)`` of the mean
    of |q|. A gather score ``scale a . k`` is then off by ``E_g = (gamma(T) + gamma(D) + 3u)
    A_g``, A_g the largest ``|scale| sum pool(|q|)_d |k_d|``, its softmax over T keys by
    ``2E_g + 4eta + 3gamma(T) + 2u``; a broadcast score ``scale q . a`` likewise over the n
    agents. The two weights multiply."""
    r = rounding(q.dtype)
    q64, k64 = q.double(), k.double()
    length, dim, n_kv = k.shape[2], q.shape[-1], k.shape[1]
    scale = view.scale if view else dim**-0.5
    pooled = pool_tokens(q64.abs(), method.n_agents)  # [B, H, n, D]
    e = r.gamma(length) + r.gamma(dim) + 3 * r.u
    e_g = e * _abs_scores(_grouped(pooled, n_kv), k64, scale)
    e_b = e * _abs_scores(q64, pooled, scale)
    n = pooled.shape[2]
    rho = 2 * e_g + 2 * e_b + 8 * r.eta + 3 * r.gamma(length) + 3 * r.gamma(n) + 4 * r.u
    return _magnitude_bound(method, q, k, v, rho, r, view)


def bound_sse(method: SSE, q, k, v, view=None, n_calls: int = 1):
    """SSE. The read softmax over D of ``sqrt(scale) q`` (scaling, and the subtraction of the
    max: ``E_q = 3u sqrt(scale) max|q|``) is off by ``2E_q + 2eta + gamma(D) + u`` relative; the
    write softmax over the top-k likewise with ``gamma(k)``; a weight ``read . write`` adds
    ``gamma(D)``, and the normalised n-term sums (state and chunk: at most n + D terms per output)
    double the weights' error and add ``2 gamma(n + D + 2) + u``. The selection is on the raw keys,
    exact in every dtype."""
    r = rounding(q.dtype)
    dim = q.shape[-1]
    root = (view.scale if view else dim**-0.5) ** 0.5
    e_q = 3 * r.u * root * float(q.double().abs().max())
    e_k = 3 * r.u * root * float(k.double().abs().max())
    rel_read = 2 * e_q + 2 * r.eta + r.gamma(dim) + r.u
    rel_write = 2 * e_k + 2 * r.eta + r.gamma(method.top_k) + r.u
    n = k.shape[2]
    rho = 2 * (rel_read + rel_write + r.gamma(dim)) + 2 * r.gamma(n + dim + 2) + r.u
    return _magnitude_bound(method, q, k, v, rho, r, view)


def bound_flowformer(method: Flowformer, q, k, v, view=None, n_calls: int = 1):
    """Flowformer: every factor but v is positive, built in stages whose relative errors add:
    phi = sigmoid (eps1 = eta + 2u); prefix sums of phi (eps1 + g, g = gamma(n + D + 4) covering
    any one sum or dot, carried state included); the flows I, O (a dot of two such, a division:
    r1 = 2eps1 + 2g + 3u); the conserved flows (r2 = 4eps1 + 4g + 7u); the allocation
    sigmoid(sink) (r2 max(sink) + eps1); exp(source), source clamped to +-10
    (expm1(r2 max(source)) + eta); the competition (a ratio with its prefix sum:
    2 rho_exp + g + u); the output (phi(q), 1 / I, the state's sums, the dot, the allocation:
    eps1 + r1 + u + eps1 + rho_comp + 2g + rho_alloc + 2u)."""
    r = rounding(q.dtype)
    q64, k64 = q.double(), k.double()
    flows = method.flows(q64, k64)
    g = r.gamma(k.shape[2] + q.shape[-1] + 4)
    eps1 = r.eta + 2 * r.u
    r1 = 2 * eps1 + 2 * g + 3 * r.u
    r2 = 4 * eps1 + 4 * g + 7 * r.u
    rho_alloc = r2 * float(flows.sink.abs().max()) + eps1
    rho_exp = math.expm1(r2 * min(float(flows.source.abs().max()), CLAMP)) + r.eta
    rho_comp = 2 * rho_exp + g + r.u
    rho = 2 * eps1 + r1 + rho_comp + 2 * g + rho_alloc + 3 * r.u
    return _magnitude_bound(method, q, k, v, rho, r, view)


def bound_soft(method: SOFT, q, k, v, view=None, n_calls: int = 1):
    """SOFT: ``out = P (Z (B V))``, Z computed in float64 from the same landmarks as the
    reference and rounded once (u). A kernel entry's squared distance ``|x|^2 + |y|^2 - 2 x . y``
    is off by ``e = (gamma(D + 2) + 2u)(|x|^2 + |y|^2 + 2 sum |x_d y_d|)`` (the landmark rounded
    to the accumulation dtype included), the entry by ``expm1(|scale| e / 2 + u + eta)``
    relative. The three products sum m, m and T terms. Z is signed: the magnitude is
    ``|P| |Z| |B| |V|``."""
    r = rounding(q.dtype)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    batch, n_heads, length, dim = q.shape
    scale = view.scale if view else dim**-0.5
    ref = method.reference(q64, k64, v64, view)
    if k.shape[2] == 0:
        return ref, torch.zeros_like(ref)
    points, inverse = method.landmarks(k64, scale)
    rows = _grouped(q64, k.shape[1])

    def kernel_rel(x, y):  # the largest relative error of an entry of gaussian(x, y)
        sq = (x * x).sum(-1, keepdim=True) + (y * y).sum(-1).unsqueeze(-2)
        e = (r.gamma(dim + 2) + 2 * r.u) * (sq + 2 * x.abs() @ y.abs().transpose(-1, -2))
        return math.expm1(abs(scale) * float(e.max()) / 2 + r.u + r.eta)

    from longattn.methods.soft import gaussian

    p, b = gaussian(rows, points, scale), gaussian(points, k64, scale)
    mag = p @ (inverse.abs() @ (b @ v64.abs()))
    rho = kernel_rel(rows, points) + kernel_rel(points, k64) + r.u
    rho += r.gamma(length) + 2 * r.gamma(points.shape[2]) + 3 * r.u
    mag = mag.view(batch, n_heads, length, -1)
    return ref, math.expm1(rho) * (1 + r.u_out) * mag + r.u_out * ref.abs()


BOUNDS = {
    Latte: bound_latte,
    Aaren: bound_aaren,
    Mega: bound_mega,
    AgentAttention: bound_agent,
    SSE: bound_sse,
    Flowformer: bound_flowformer,
    SOFT: bound_soft,
}


def forward_bound(method, q, k, v, view=None):
    """(float64 reference, element-wise bound) of a ``forward`` method's call on ``q, k, v``."""
    bound = BOUNDS.get(type(method))
    if bound is None:
        raise AssertionError(
            f"no derived bound for the forward method {type(method).__name__}: add one to "
            "longattn.testing_forms.BOUNDS"
        )
    return bound(method, q, k, v, view)
