"""The float64 oracle of linear attention (``longattn.kernels.linear``) and its derived rounding
bound, for tests and benchmarks; ``longattn.testing`` re-exports them."""

from __future__ import annotations

import typing

import torch

from longattn.kernels.linear import LinearState
from longattn.types import EXP_ULPS, FeatureView, accumulation_dtype


class LinearBound(typing.NamedTuple):
    """The float64 reference of a linear-attention call and the element-wise bound a correct
    implementation stays within (see ``linear_bound``): ``ref`` [B, H, Tq, Dv], ``out`` like it,
    ``state`` the float64 state after the call (None for non-causal calls)."""

    ref: torch.Tensor
    out: torch.Tensor
    state: typing.Any


def _linear_parts(q, k, v, log_decay, state, window, q_raw, k_raw, scale, sinks=0):
    """Per query: the weights of every (query, key) pair and of the carried state, float64.

    Returns (kern [B, Hkv, G, Tq, Tk] the pair weights ``w_ts * (q_t . k_s)`` or, in the window,
    ``w_ts exp(scale q_raw_t . k_raw_s)``, mags [same] their magnitudes ``sum_f |q k| w``,
    state_rows [B, Hkv, G, Tq, F] ``q_t * prod_{r<=t} a_r`` (what reads the carried state),
    cum [B, Hkv, Tk(, F)] the cumulative log gates, in_window [Tq, Tk] bool: the window's keys
    and the sinks, the first ``sinks`` keys)."""
    batch, n_heads, q_len, feat = q.shape
    n_kv, kv_len = k.shape[1], k.shape[2]
    group, offset = n_heads // n_kv, kv_len - q_len
    qg = q.view(batch, n_kv, group, q_len, feat)
    if log_decay is None:
        cum = torch.zeros(batch, n_kv, kv_len, dtype=torch.float64)
    elif log_decay.dim() == 1:
        cum = log_decay.double()[None, :, None] * torch.ones(kv_len, dtype=torch.float64)
        cum = cum.expand(batch, -1, -1).cumsum(-1)
    else:
        cum = log_decay.double().cumsum(2)
    t_pos = torch.arange(offset, kv_len)
    s_pos = torch.arange(kv_len)
    causal = s_pos[None, :] <= t_pos[:, None]  # [Tq, Tk]
    in_window = causal & ((t_pos[:, None] - s_pos[None, :] < window) | (s_pos[None, :] < sinks))
    c_t = cum[:, :, offset:]  # [B, Hkv, Tq(, F)]
    if cum.dim() == 4:  # per channel: [B, Hkv, Tq, Tk, F]
        w = (c_t[:, :, :, None] - cum[:, :, None]).masked_fill(~causal[..., None], -torch.inf)
        w = w.exp()[:, :, None]  # [B, Hkv, 1, Tq, Tk, F]
        kern = (qg[:, :, :, :, None] * k[:, :, None, None] * w).sum(-1)
        mags = (qg.abs()[:, :, :, :, None] * k.abs()[:, :, None, None] * w).sum(-1)
        state_rows = qg * c_t.exp()[:, :, None]
    else:
        w = (c_t[..., :, None] - cum[..., None, :]).masked_fill(~causal, -torch.inf).exp()
        w = w[:, :, None]  # [B, Hkv, 1, Tq, Tk]
        kern = (qg @ k[:, :, None].transpose(-1, -2)) * w
        mags = (qg.abs() @ k.abs()[:, :, None].transpose(-1, -2)) * w
        state_rows = qg * c_t.exp()[:, :, None, :, None]
    if window:
        qr = q_raw.double().view(batch, n_kv, group, q_len, -1)
        exact = (scale * (qr @ k_raw.double()[:, :, None].transpose(-1, -2))).exp() * w
        kern = torch.where(in_window, exact, kern)
        mags = torch.where(in_window, exact, mags)
    return kern, mags, state_rows, cum, in_window


def linear_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    log_decay: torch.Tensor | None = None,
    beta: torch.Tensor | None = None,
    normalize: bool = True,
    state=None,
    window: int = 0,
    q_raw: torch.Tensor | None = None,
    k_raw: torch.Tensor | None = None,
    scale: float | None = None,
    sinks: int = 0,
):
    """The float64 definition of ``longattn.kernels.linear.linear_attention`` (same arguments):
    the quadratic form ``out_t = sum_s K_ts [v_s, 1] (+ the carried state read with its decay)``
    with ``K_ts = q_t . (w_ts * k_s)``, ``w_ts = prod_{s<r<=t} a_r`` (per channel when the gate
    is), ``exp(scale q_raw_t . k_raw_s) w_ts`` inside the window and on the first ``sinks`` keys; for the delta rule the float64
    recurrence ``S_t = (I - b_t k_t k_t^T) diag(a_t) S_{t-1} + b_t k_t v_t^T``, ``o_t = S_t^T q_t``.
    Returns (out [B, H, Tq, Dv] float64, LinearState in float64 or None)."""
    q, k, v = (t.double() for t in (q, k, v))
    if scale is None and q_raw is not None:
        scale = q_raw.shape[-1] ** -0.5
    if not causal:
        kern = q.view(q.shape[0], k.shape[1], -1, q.shape[2], q.shape[3]) @ k[:, :, None].transpose(
            -1, -2
        )
        num, den = kern @ v[:, :, None], kern.sum(-1, keepdim=True)
        out = _ratio(num, den) if normalize else num
        return out.reshape(q.shape[:3] + v.shape[3:]), None
    if beta is not None:
        return _delta_reference(q, k, v, log_decay, beta, state)
    kern, _, state_rows, cum, _ = _linear_parts(
        q, k, v, log_decay, state, window, q_raw, k_raw, scale, sinks
    )
    num = kern @ v[:, :, None]  # [B, Hkv, G, Tq, Dv]
    den = kern.sum(-1, keepdim=True)
    if state is not None:
        num = num + state_rows @ state.kv.double()[:, :, None]
        if normalize:
            den = den + state_rows @ state.k_sum.double()[:, :, None, :, None]
    out = _ratio(num, den) if normalize else num
    out = out.reshape(q.shape[:3] + v.shape[3:])
    return out, _linear_state_after(k, v, cum, state, window, normalize, sinks)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den == 0, torch.zeros_like(num), num / den)


def _linear_state_after(k, v, cum, state, window, normalize, sinks=0):
    """The state over the keys [sinks, Tk - window) plus the carried one, decayed to the last of
    the keys before the window."""
    batch, n_kv, kv_len, feat = k.shape
    n = max(kv_len - window, 0)
    kv = torch.zeros(batch, n_kv, feat, v.shape[-1], dtype=torch.float64)
    ksum = torch.zeros(batch, n_kv, feat, dtype=torch.float64)
    if state is not None:
        kv, ksum = state.kv.double(), (state.k_sum.double() if normalize else ksum)
    if n:
        c = cum[:, :, :n]
        last = c[:, :, -1:]
        w = (last - c).exp()  # [B, Hkv, n(, F)]
        head = c[:, :, -1].exp()
        wk = k[:, :, :n] * (w if w.dim() == 4 else w[..., None])
        wk[:, :, : min(sinks, n)] = 0  # the sinks stay exact
        kv = kv * (head[..., None] if head.dim() == 3 else head[..., None, None])
        ksum = ksum * (head if head.dim() == 3 else head[..., None])
        kv = kv + wk.transpose(-1, -2) @ v[:, :, :n]
        ksum = ksum + wk.sum(2)
    return LinearState(kv, ksum if normalize else None)


def _delta_reference(q, k, v, log_decay, beta, state):
    """The float64 (gated) delta-rule recurrence, token by token; returns (out, LinearState)."""
    batch, n_heads, q_len, feat = q.shape
    n_kv, kv_len = k.shape[1], k.shape[2]
    group, offset = n_heads // n_kv, kv_len - q_len
    s = torch.zeros(batch, n_kv, feat, v.shape[-1], dtype=torch.float64)
    if state is not None:
        s = state.kv.double().clone()
    gates = _gate_rows(log_decay, k)
    outs = []
    for t in range(kv_len):
        s = s * gates[:, :, t, :, None]  # diag(a_t) S
        kt, bt = k[:, :, t], beta.double()[:, :, t, None]
        s = (
            s
            + kt[..., None] * (bt * (v[:, :, t] - (kt[..., None, :] @ s).squeeze(-2)))[..., None, :]
        )
        if t >= offset:
            qt = q[:, :, t - offset].view(batch, n_kv, group, feat)
            outs.append(qt @ s)
    out = torch.stack(outs, dim=3).reshape(batch, n_heads, q_len, -1)
    return out, LinearState(s, None)


def _gate_rows(log_decay, k) -> torch.Tensor:
    """a_t per channel, float64 [B, Hkv, Tk, F] (ones without a gate)."""
    batch, n_kv, kv_len, feat = k.shape
    if log_decay is None:
        return torch.ones(batch, n_kv, kv_len, feat, dtype=torch.float64)
    logs = log_decay.double()
    if logs.dim() == 1:
        logs = logs[None, :, None].expand(batch, n_kv, kv_len)
    if logs.dim() == 3:
        logs = logs[..., None].expand(batch, n_kv, kv_len, feat)
    return logs.exp()


def linear_bound(q, k, v, **kwargs) -> LinearBound:
    """The float64 reference of a linear-attention call (``linear_reference``, same keyword
    arguments) and a rounding-error bound for any implementation that computes it from inputs in
    their dtype with float32 accumulation (float64 for float64 inputs), in any order and split
    (chunks of any size, a recurrence, a scan), possibly rounding intermediates to the input dtype.

    Model (Higham, ch. 3). ``u`` is the accumulation's unit roundoff, ``u_in`` the inputs',
    ``gamma(n) = n u / (1 - n u)``, ``eta = EXP_ULPS * eps`` an exponential's relative error.

    Feature-map forms (no delta rule). Output t is a sum over terms ``K_ts [v_s, 1]`` of the
    visible keys and the carried state. A term's decay ``w_ts = prod_{s<r<=t} a_r`` may be formed
    as a product of its t - s gates (a recurrence: one exp and one rounding each) or as the exp of
    differences of prefix sums of log gates (chunked forms: a few exps, and sums of logs whose error
    is at most ``gamma(Tk) * Lambda_t``, ``Lambda_t = sum_{r<=t} max_f |log a_r|``, on each side), so
    its relative error is at most ``rho_ts = (t - s + 3)(eta + u) + 2 gamma(Tk) Lambda_t`` (0
    without gates; the state counts as s = -1). A term is a product of q, k, the weight and v, a
    dot product over F, and the n_t-term sum over keys in any association: ``gamma(F + n_t + 4)``;
    scores, weighted scores and the state may each be rounded to the input dtype: ``3 u_in``.
    Inside a window (and on the sinks) a term is ``exp(scale q_raw . k_raw - m)``: the score's error
    ``E_t = (gamma(D) + u_in) max_s |scale| sum_d |q_raw_td k_raw_sd|`` twice (the score and the
    shift m) and ``2 eta``; the linear terms share the shift: ``2 E_t + eta + u``. With
    ``r_ts`` the sum of these, the numerator is off by at most ``eN = sum_s expm1(r_ts) |K|_ts
    |v_s|`` and the denominator by ``eD`` (the same with 1 for |v|), ``|K|_ts = sum_f |q k| w``.
    Normalised: ``|out - ref| <= (eN + |ref| eD) / (|den| - eD) + (u + u_in) |ref|`` (infinite
    where ``eD >= |den|``: a vanishing denominator cannot be bounded); else ``eN + u_in |ref|``.

    Delta rule, column by column (each column d of S evolves alone): the model is the standard
    one for a product of transitions, each step's result exact for data perturbed by
    ``kappa u + 2 u_in`` relative, ``kappa = F + Tk + 4`` (the longest reduction a step may join:
    a dot product over F plus the sums over up to Tk keys a chunked WY form adds; two roundings to
    the input dtype), plus the gate's ``eta + u + 2 gamma(Tk) max_f |log a_t|``. With
    ``alpha_t = max_f a_t * max(1, |1 - b_t |k_t|^2|)`` (a bound on ``|A_t|_2``) the error of
    column d obeys ``e_t = alpha_t (e_{t-1} + (kappa u + 2 u_in + gate) |s_{t-1}|) + (kappa u +
    2 u_in) b_t |v_td| |k_t|``, and ``|o_td - ref| <= |q_t|_2 e_t + gamma(F + Tk) sum_f |q_tf
    s_tfd| + u_in |ref|``. The WY form's triangular solve is inside this model while the
    transitions are contractions (``|k_t| <= 1``, as DeltaNet normalises its keys).

    Nothing is fitted; a dropped key or a wrong decay moves an output by far more in float32
    (``tests/test_linear_kernel.py``)."""

    ref, ref_state = linear_reference(q, k, v, **kwargs)
    # the inputs' roundoff is the coarser of the features' and the values' (features may be
    # computed in float32 from bfloat16 inputs: the output is still rounded to bfloat16)
    u_in = max(torch.finfo(q.dtype).eps, torch.finfo(v.dtype).eps) / 2
    acc = accumulation_dtype(v.dtype)
    u, eta = torch.finfo(acc).eps / 2, EXP_ULPS * torch.finfo(acc).eps
    if kwargs.get("beta") is not None:
        bound = _delta_bound(q, k, v, ref, kwargs, u, u_in, eta)
    else:
        bound = _feature_bound(q, k, v, ref, kwargs, u, u_in, eta)
    return LinearBound(ref, bound, ref_state)


def _gamma(n, u):
    return n * u / (1 - n * u)


def _feature_bound(q, k, v, ref, kw, u, u_in, eta) -> torch.Tensor:
    q64, k64, v64 = (t.double() for t in (q, k, v))
    batch, n_heads, q_len, feat = q.shape
    n_kv, kv_len = k.shape[1], k.shape[2]
    group, offset = n_heads // n_kv, kv_len - q_len
    causal, window, state = kw.get("causal", True), kw.get("window", 0), kw.get("state")
    normalize, log_decay = kw.get("normalize", True), kw.get("log_decay")
    if not causal:
        mags = q64.view(batch, n_kv, group, q_len, feat).abs() @ k64.abs()[:, :, None].transpose(
            -1, -2
        )
        rel = torch.full(mags.shape, _gamma(feat + kv_len + 4, u) + 3 * u_in, dtype=torch.float64)
        kern = q64.view(batch, n_kv, group, q_len, feat) @ k64[:, :, None].transpose(-1, -2)
        den = kern.sum(-1, keepdim=True)
        return _combine(mags, rel, None, None, v64, ref, den, normalize, u, u_in)
    scale = kw.get("scale")
    if scale is None and kw.get("q_raw") is not None:
        scale = kw["q_raw"].shape[-1] ** -0.5
    kern, mags, state_rows, _, in_window = _linear_parts(
        q64,
        k64,
        v64,
        log_decay,
        state,
        window,
        kw.get("q_raw"),
        kw.get("k_raw"),
        scale,
        kw.get("sinks", 0),
    )
    t_pos = torch.arange(offset, kv_len, dtype=torch.float64)
    ages = t_pos[:, None] - torch.arange(kv_len, dtype=torch.float64)[None, :]  # t - s
    causal_mask = ages >= 0
    n_t = causal_mask.sum(-1).double() + (state is not None)  # [Tq]
    base = _gamma(feat + n_t + 4, u)[:, None] + 3 * u_in  # [Tq, 1]
    if log_decay is None:
        rho = torch.zeros_like(ages)
        rho_state = torch.zeros(q_len, dtype=torch.float64)
    else:
        logs = log_decay.double().abs()
        if logs.dim() == 1:
            logs = logs[None, :, None].expand(batch, n_kv, kv_len)
        elif logs.dim() == 4:
            logs = logs.amax(-1)
        lam = logs.cumsum(-1)[:, :, offset:].amax(dim=(0, 1))  # [Tq]: Lambda_t, worst head
        rho = (ages.clamp(min=0) + 3) * (eta + u) + 2 * _gamma(kv_len, u) * lam[:, None]
        rho_state = (t_pos + 4) * (eta + u) + 2 * _gamma(kv_len, u) * lam
    rel = base + rho  # [Tq, Tk]
    rel_state = _gamma(feat + n_t + 4, u) + 3 * u_in + rho_state  # [Tq]
    if window:
        qr, kr = kw["q_raw"].double(), kw["k_raw"].double()
        qr = qr.view(batch, n_kv, group, q_len, -1)
        raw_mag = abs(scale) * (qr.abs() @ kr.abs()[:, :, None].transpose(-1, -2))
        e_t = (_gamma(qr.shape[-1], u) + u_in) * raw_mag.masked_fill(~in_window, 0.0).amax(-1)
        extra = 2 * e_t[..., None] + torch.where(in_window, 2 * eta, eta + u)  # [B,Hkv,G,Tq,Tk]
        rel = rel + extra
        rel_state = rel_state + 2 * e_t + eta + u
    stat, den = None, kern.sum(-1, keepdim=True)  # den [B, Hkv, G, Tq, 1]
    if state is not None:
        stat = (state_rows.abs() @ state.kv.double().abs()[:, :, None], None)
        if normalize:
            k_sum = state.k_sum.double()[:, :, None, :, None]
            stat = (stat[0], state_rows.abs() @ k_sum.abs())
            den = den + state_rows @ k_sum
    rel_state = rel_state.view(1, 1, 1, q_len) if rel_state.dim() == 1 else rel_state
    return _combine(mags, rel, stat, rel_state, v64, ref, den, normalize, u, u_in)


def _combine(mags, rel, stat, rel_state, v64, ref, den, normalize, u, u_in) -> torch.Tensor:
    """eN, eD from the terms' magnitudes and relative errors, then the ratio's bound.
    mags, rel [B, Hkv, G, Tq, Tk]; stat (|state rows| @ |kv|, @ |k_sum|) or None; den the exact
    denominator [B, Hkv, G, Tq, 1] (None when not normalising)."""
    weights = torch.expm1(rel) * mags
    err_num = weights @ v64.abs()[:, :, None]  # [B, Hkv, G, Tq, Dv]
    err_den = weights.sum(-1, keepdim=True)
    if stat is not None:
        grow = torch.expm1(rel_state)[..., None]
        err_num = err_num + grow * stat[0]
        if stat[1] is not None:
            err_den = err_den + grow * stat[1]
    err_num = err_num.reshape(ref.shape)
    if not normalize:
        return err_num + u_in * ref.abs()
    err_den, den = (t.reshape(ref.shape[:3] + (1,)) for t in (err_den, den))
    room = den.abs() - err_den
    ratio = (err_num + ref.abs() * err_den) / room.clamp(min=torch.finfo(torch.float64).tiny)
    ratio = torch.where(room > 0, ratio, torch.full_like(ratio, torch.inf))
    exact_zero = (den == 0) & (err_den == 0)  # nothing visible: the row must be exactly 0
    return torch.where(exact_zero, torch.zeros_like(ratio), ratio + (u + u_in) * ref.abs())


def _delta_bound(q, k, v, ref, kw, u, u_in, eta) -> torch.Tensor:
    """The delta rule's column-wise bound (see ``linear_bound``), by the float64 recurrence."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    batch, n_heads, q_len, feat = q.shape
    n_kv, kv_len = k.shape[1], k.shape[2]
    group, offset = n_heads // n_kv, kv_len - q_len
    gates = _gate_rows(kw.get("log_decay"), k)  # [B, Hkv, Tk, F]
    beta = kw["beta"].double()
    state = kw.get("state")
    s = (
        state.kv.double().clone()
        if state is not None
        else v64.new_zeros(batch, n_kv, feat, v.shape[-1])
    )
    err = v64.new_zeros(batch, n_kv, v.shape[-1])  # e_t per column
    kappa_u = (feat + kv_len + 4) * u + 2 * u_in
    k_norm2 = (k64 * k64).sum(-1)  # [B, Hkv, Tk]
    bounds = []
    for t in range(kv_len):
        a_t, b_t = gates[:, :, t], beta[:, :, t]
        alpha = a_t.amax(-1) * torch.clamp((1 - b_t * k_norm2[:, :, t]).abs(), min=1.0)
        gate_err = eta + u + 2 * _gamma(kv_len, u) * a_t.log().abs().amax(-1)
        col_norm = s.norm(dim=2)  # [B, Hkv, Dv]: |s_{t-1}| per column
        step = (b_t * k_norm2[:, :, t].sqrt())[..., None] * v64[:, :, t].abs()
        err = alpha[..., None] * (err + (kappa_u + gate_err[..., None]) * col_norm)
        err = err + kappa_u * step
        kt = k64[:, :, t]
        s = s * a_t[..., None]
        s = (
            s
            + kt[..., None]
            * (b_t[..., None] * (v64[:, :, t] - (kt[..., None, :] @ s).squeeze(-2)))[..., None, :]
        )
        if t >= offset:
            qt = q64[:, :, t - offset].view(batch, n_kv, group, feat)
            read = qt.abs() @ s.abs()  # [B, Hkv, G, Dv]
            bounds.append(
                qt.norm(dim=-1, keepdim=True) * err[:, :, None] + _gamma(feat + kv_len, u) * read
            )
    out = torch.stack(bounds, dim=3).reshape(ref.shape)
    return out + u_in * ref.abs()


def within(name: str, diff: torch.Tensor, bound: torch.Tensor) -> None:
    """Fail with the worst element when any ``|diff|`` exceeds its ``bound`` (NaN fails)."""
    excess = diff.abs() - bound
    bad = ~(excess <= 0)
    if bool(bad.any()):
        where = tuple(int(i) for i in bad.nonzero()[0])
        worst = excess.nan_to_num(torch.inf).argmax()
        raise AssertionError(
            f"|{name} - ref64| = {diff.abs().flatten()[worst].item():.3e} exceeds its bound "
            f"{bound.flatten()[worst].item():.3e} (first failing element {where}, "
            f"max|{name} - ref64| = {diff.abs().max().item():.3e})"
        )


def assert_linear_close(out: torch.Tensor, bound: LinearBound) -> float:
    """Assert ``out`` is within ``bound`` element by element (shape and finiteness too); returns
    max|out - ref64|."""
    if out.shape != bound.ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(bound.ref.shape)}")
    diff = out.double() - bound.ref
    within("out", diff, bound.out)
    return diff.abs().max().item() if out.numel() else 0.0


def assert_linear_method_close(
    result: typing.Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, method: typing.Any,
    *, layer: int = 0, scale: float | None = None,
) -> float:  # fmt: skip
    """Assert that ``result`` (an ``AttnOutput`` or tensor) of a linear method on ``q, k, v`` is
    within ``linear_bound`` of the float64 oracle, element by element; returns the error.

    ``feature_map`` methods: the oracle runs on the features and gates the library computes
    (``longattn.linear.feature_inputs``, in the accumulation dtype), widened to float64, so the
    engine and the library's plumbing are checked against the definition on those features; a
    map's own float32 rounding is its method's test. For float64 inputs this is the whole
    definition in float64. ``forward`` methods: ``method.reference`` in float64 and the method's
    derived ``error_bound(q, k, v, ref, view)`` (element-wise, for its implementation in the
    inputs' dtype)."""
    from longattn import linear

    out = result.out if hasattr(result, "out") else result
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if out.dtype != q.dtype:
        raise AssertionError(f"output dtype {out.dtype} != input dtype {q.dtype}")
    cal = linear.calibration_for(method, k, layer)
    if method.hook == "forward":
        view = FeatureView("query", layer, scale, cal)
        ref = method.reference(*(t.double() for t in (q, k, v)), view)
        return assert_linear_close(
            out, LinearBound(ref, method.error_bound(q, k, v, ref, view), None)
        )
    phi_q, phi_k, log_decay, beta = linear.feature_inputs(method, q, k, layer, scale, cal)
    wide = lambda t: None if t is None else t.double()  # noqa: E731
    kwargs = dict(causal=method.causal, log_decay=wide(log_decay), beta=wide(beta),
                  normalize=method.normalize)  # fmt: skip
    if method.window:
        kwargs.update(window=method.window, q_raw=q.double(), k_raw=k.double(), scale=scale,
                      sinks=method.sinks)  # fmt: skip
    bound = linear_bound(phi_q, phi_k, v, **kwargs)
    return assert_linear_close(out, bound)
