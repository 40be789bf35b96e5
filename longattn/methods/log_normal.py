"""Linear Log-Normal attention: exponential feature maps with moment-matched temperatures."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longattn.method import LinearAttention, register
from longattn.types import FeatureView

# The paper's linear fit of the log-variance of LLN weights, sigma_lln^2 ~= 2 A s^2 + B with
# s = alpha sigma_q = beta sigma_k (the constants of the reference implementation).
FIT_A = 0.14855178144710912
FIT_B = -0.35487039130661086


def matched_std(q_std: torch.Tensor, k_std: torch.Tensor, scale: float, dim: int) -> torch.Tensor:
    """The moment-matched s = alpha sigma_q = beta sigma_k: the LLN log-weights get the variance of
    the softmax's scores, sigma_sm^2 = scale^2 D sigma_q^2 sigma_k^2 (the variance of scale q . k
    for independent entries; sigma_q^2 sigma_k^2 at the usual scale 1 / sqrt(D)), so
    2 A s^2 + B = sigma_sm^2. Broadcasts over heads."""
    sm_var = scale**2 * dim * q_std**2 * k_std**2
    return ((sm_var - FIT_B) / (2 * FIT_A)).sqrt()


@register("log_normal")
@dataclass(frozen=True)
class LogNormal(LinearAttention):
    """Linear Log-Normal attention: phi_q(q) = exp(alpha q), phi_k(k) = exp(beta k)
    (element-wise), with alpha and beta chosen by moment matching so that the log-normal
    weights have the variance of the softmax's. Nahshan et al. 2023, arXiv:2311.13541.

    ``q_std`` and ``k_std`` are the standard deviations of query and key entries the matching
    assumes; a calibration (``calibration``: a path, loaded by the library) overrides them per
    layer and head with tensors ``q_std`` [Hkv, G] (query head h = KV head h // G's member
    h % G) and ``k_std`` [Hkv]. Under grouped-query attention a KV head's keys serve several
    query heads, so the matched s is computed per KV head from the group's root-mean-square
    ``q_std``.
    A query's features are divided by their largest one (cancels in the normaliser, so
    ``normalize`` must be True and ``window`` 0); keys are not shifted, and exp(beta k)
    overflows float32 only for an entry beyond ~88 / beta (about 41 standard deviations at the
    default statistics and scale).
    Deviation from paper: the reference code measures sigma_q and sigma_k over each call's whole
    query and key tensors and shifts the keys by their maximum over the call: both depend on
    future tokens and on the batch, so chained calls would disagree with one pass. Here the
    statistics are fixed (fields or a calibration) and the keys unshifted. The paper's
    block-diagonal softmax term (LLN+Diag) is not included; ``window`` is the library's exact
    local term, which needs features on the softmax's absolute scale, which LLN's are not.
    """

    q_std: float = 1.0
    k_std: float = 1.0
    calibration: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        name = type(self).__name__
        for key in ("q_std", "k_std"):
            value = getattr(self, key)
            if not value > 0 or value == float("inf"):
                raise ValueError(f"{name}.{key} must be a finite number > 0, got {value}")
        if self.calibration is not None and not self.calibration:
            raise ValueError(f"{name}.calibration must be a path or None, got ''")
        if not self.normalize:
            raise ValueError(
                f"{name}.normalize must be True, got {self.normalize}: LLN weights are a "
                "distribution, and the per-query rescaling is cancelled only by the normaliser"
            )
        if self.window:
            raise ValueError(
                f"{name}.window must be 0, got {self.window}: LLN features are not on the "
                "scale of the window's exact scores"
            )

    def statistics(self, view: FeatureView) -> tuple[torch.Tensor, torch.Tensor]:
        """(q_std [H], k_std [Hkv]) float64 for this layer: its calibration's tensors (both or
        neither; q_std flattened from [Hkv, G]), else the fields as one head of each."""
        tensors = view.calibration or {}
        given = [key for key in ("q_std", "k_std") if key in tensors]
        if len(given) == 1:
            raise ValueError(
                f"LogNormal calibration of layer {view.layer} has {given[0]!r} without its pair"
            )
        if not given:
            return torch.tensor([self.q_std], dtype=torch.float64), torch.tensor(
                [self.k_std], dtype=torch.float64
            )
        q_std, k_std = (tensors[key].detach().double().cpu() for key in ("q_std", "k_std"))
        if q_std.dim() != 2 or k_std.dim() != 1 or q_std.shape[0] != k_std.shape[0]:
            raise ValueError(
                f"LogNormal calibration of layer {view.layer}: 'q_std' must be [Hkv, G] and "
                f"'k_std' [Hkv], got {tuple(q_std.shape)} and {tuple(k_std.shape)}"
            )
        for key, value in (("q_std", q_std), ("k_std", k_std)):
            if not bool(torch.isfinite(value).all() and (value > 0).all()):
                raise ValueError(
                    f"LogNormal calibration {key!r} of layer {view.layer} must be finite and "
                    f"> 0, got {value.tolist()}"
                )
        q_std = q_std.flatten()  # [H]: query head h = KV head h // G, member h % G
        return q_std, k_std

    def feature_map(self, x: torch.Tensor, view: FeatureView) -> torch.Tensor:
        q_std, k_std = self.statistics(view)
        group = q_std.numel() // k_std.numel()
        group_q = (q_std**2).view(-1, group).mean(-1).sqrt()  # [Hkv]: the group's rms q_std
        s = matched_std(group_q, k_std, view.scale, x.shape[-1])  # [Hkv]
        temp = s / k_std if view.role == "key" else s.repeat_interleave(group) / q_std
        if temp.numel() not in (1, x.shape[1]):
            raise ValueError(
                f"LogNormal calibration of layer {view.layer} has {temp.numel()} {view.role} "
                f"heads, the call has {x.shape[1]}"
            )
        logits = x * temp.to(device=x.device, dtype=x.dtype).view(-1, 1, 1)  # [B, heads, T, D]
        if view.role != "key":
            logits = logits - logits.amax(-1, keepdim=True)  # per query: cancels in the normaliser
        return torch.exp(logits)
