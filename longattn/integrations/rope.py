"""Rotary frames for StreamingLLM's cache positions (``positions="cache"``), arXiv:2309.17453.

The paper rotates keys and queries at their slots in the cache: sinks at 0..sinks-1, the window after
them, a query at its own slot. RoPE scores depend only on the difference of two angles, so any frame
that keeps every query-key distance gives the same attention. The frame used here: every token at its
original position (the window is contiguous, so its distances are already the slot distances) and
the sinks at ``s + evicted``, where ``evicted`` is the number of tokens dropped between the sinks and
the window: a query at original ``p`` sits at slot ``p - evicted`` and sees sink ``s`` at its slot
distance. Only the sinks move (from a pristine copy, so rotations never accumulate rounding), and the
angles are float64 (the model's float32 angle at a large position is off by up to
``p * omega * 2**-24`` rad; it is undone exactly and replaced), so the stream has no position limit.
InfiniAttention's ``positions="segment"`` uses the same re-rotation with every token at its offset
inside its segment (``Corrections(frame, wrap=segment)``), no sinks.
Pure torch; ``longattn.integrations.hf`` builds the frame from the model and calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from longattn.cache import KVCache


# rope types whose frequencies are fixed (no rescaling with the sequence length) and unscaled cos/sin
FIXED_ROPE_TYPES = ("default", "linear", "llama3")
STATE_KEY = "streaming_rope_sinks"
SHIFT_KEY = "streaming_rope_shift"  # the last sink rotation built, reused by the next layers


@dataclass(frozen=True)
class RopeFrame:
    """A model's Llama-style (``rotate_half``) rotary embedding: ``inv_freq`` [D/2] float32, as the
    model multiplies it by its float32 positions."""

    inv_freq: torch.Tensor

    @classmethod
    def from_rotary(cls, rotary: torch.nn.Module, head_dim: int, arch: str) -> RopeFrame:
        """The frame of a transformers rotary embedding module; ``ValueError`` for one it cannot redo."""
        rope_type = getattr(rotary, "rope_type", None)
        if not isinstance(rope_type, str) or rope_type not in FIXED_ROPE_TYPES:
            raise ValueError(
                f"{arch}: re-rotated positions ('cache', 'segment') need RoPE of types "
                f"{', '.join(FIXED_ROPE_TYPES)}; this model's rope_type is {rope_type!r}"
            )
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        inv_freq = getattr(rotary, "inv_freq", None)
        if scaling != 1.0 or not isinstance(inv_freq, torch.Tensor) or inv_freq.dim() != 1:
            raise ValueError(
                f"{arch}: re-rotated positions need one unscaled frequency vector per model "
                f"(attention_scaling={scaling})"
            )
        if 2 * inv_freq.numel() != head_dim:
            raise ValueError(
                f"{arch}: re-rotated positions need RoPE over the whole head ({head_dim} dims), "
                f"this model rotates {2 * inv_freq.numel()} (partial rotary)"
            )
        return cls(inv_freq.detach().float().clone())

    def _angles(self, positions: torch.Tensor) -> torch.Tensor:
        """float64 angles [..., D/2] of integer ``positions``."""
        return positions.to(torch.float64)[..., None] * self.inv_freq.to(positions.device).double()

    def _model_cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """The cos and sin the model applied, bit for bit (its float32 product, cast to ``dtype``)."""
        angle = positions[..., None].float() * self.inv_freq.to(positions.device)
        return angle.cos().to(dtype).double(), angle.sin().to(dtype).double()

    def correction(
        self, model_pos: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype
    ) -> Rotation:
        """The rotation ``correct`` applies to a ``dtype`` tensor rotated by the model at
        ``model_pos`` [1|B, T] and wanted at ``pos`` [B, T]: R(pos) M^-1 with float64 angles."""
        cos_m, sin_m = self._model_cos_sin(model_pos, dtype)
        angle = self._angles(pos)
        cos_p, sin_p = angle.cos(), angle.sin()
        # R(pos) M^-1 with M the model's rotation; its rounded cos and sin make M^-1 = M^T / (c² + s²)
        norm = cos_m.square() + sin_m.square()
        cos_d, sin_d = cos_p * cos_m + sin_p * sin_m, sin_p * cos_m - cos_p * sin_m
        return Rotation.of(cos_d / norm, sin_d / norm, dtype)

    def correct(self, x: torch.Tensor, model_pos: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """``x`` [B, H, T, D] rotated by the model at ``model_pos`` [1|B, T], re-rotated at ``pos``
        [B, T] with float64 angles (one rotation by the difference)."""
        return self.correction(model_pos, pos, x.dtype).apply(x)

    def shift_by(self, by: int, dtype: torch.dtype, device: torch.device) -> Rotation:
        """The rotation by ``by`` positions (float64 angles) for ``dtype`` tensors."""
        angle = self._angles(torch.tensor([by], device=device))  # [1, D/2]
        return Rotation.of(angle.cos()[None], angle.sin()[None], dtype)

    def shift(self, x: torch.Tensor, by: int) -> torch.Tensor:
        """``x`` [B, H, T, D] rotated further by ``by`` positions (float64 angles)."""
        return self.shift_by(by, x.dtype, x.device).apply(x)


@dataclass(frozen=True)
class Rotation:
    """A rotary rotation ready to apply: ``x * cos + rotate_half(x) * sin`` as
    ``x * full_cos + roll(x, D/2) * signed_sin``, full_cos = [c, c] and signed_sin = [-s, s]
    [B|1, 1, T, D] in the work dtype (float32 at least, float64 for float64 keys), so one rotation
    is four tensor operations. Element for element it rounds as ``x1 c - x2 s`` and ``x2 c + x1 s``
    (a negated factor rounds to the negated product), the same bits."""

    full_cos: torch.Tensor
    signed_sin: torch.Tensor
    dtype: torch.dtype

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> Rotation:
        """From float64 cos, sin [B|1, T, D/2] for tensors of ``dtype``.

        Computed in float32 at least (float64 for float64 keys): one rotation rounds once, and
        rotations never compound (the angles are exact differences), so float32 loses nothing
        that matters."""
        work = torch.promote_types(dtype, torch.float32)
        c, s = cos[:, None].to(work), sin[:, None].to(work)  # [B|1, 1, T, D/2]
        return cls(torch.cat((c, c), dim=-1), torch.cat((-s, s), dim=-1), dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [B, H, T, D] rotated, back in its dtype."""
        if x.dtype != self.dtype:
            raise TypeError(f"a rotation for {self.dtype} applied to a {x.dtype} tensor")
        work = x if x.dtype == self.full_cos.dtype else x.to(self.full_cos.dtype)
        # [x2, x1]: the halves swapped by one flip (a roll costs two slices and a cat)
        turned = work.unflatten(-1, (2, work.shape[-1] // 2)).flip(-2).flatten(-2)
        out = work * self.full_cos + turned * self.signed_sin
        return out if out.dtype == x.dtype else out.to(x.dtype)


def place_sinks(kv: KVCache, layer: int, sinks: int, window: int, frame: RopeFrame) -> None:
    """Rotate ``layer``'s sink keys to ``s + evicted`` after a call (no padding: every row alike).

    ``evicted`` counts the tokens between the sinks and the window the next query sees, also those
    the library has not compacted away yet (it evicts a page of them at once; the mask hides them).
    The first time tokens are evicted the sinks (still at their own positions) are copied; every later
    placement rotates that copy, so a key is rounded once per placement, never cumulatively.
    """
    held = kv.positions(layer)[0]  # [T], strictly increasing (unpadded rows)
    newest = int(held[-1])
    # counted by one binary search on the sorted positions, no [T] temporaries: the sinks held
    # (a layer's own window may have evicted them) and where the window the next query sees
    # starts, no sink (positions >= max(sinks, newest + 2 - window))
    bounds = torch.tensor([sinks, max(sinks, newest + 2 - window)], device=held.device)
    n_sinks, window_start = torch.searchsorted(held, bounds).tolist()
    if n_sinks == 0:
        return
    seen_next = held.shape[0] - window_start
    evicted = newest + 1 - n_sinks - seen_next
    state = kv.state.setdefault(STATE_KEY, {})
    pristine, placed = state.get(layer, (None, 0))
    if evicted == placed:
        return
    keys = kv.keys(layer)  # [B, Hkv, T, D] view of the storage
    if pristine is None:
        pristine = keys[:, :, :n_sinks].clone()
    # every layer of a step shifts its sinks by the same amount: the rotation is built once
    known = kv.state.get(SHIFT_KEY)
    if known is None or known[0] != (evicted, keys.dtype, keys.device):
        known = (
            (evicted, keys.dtype, keys.device),
            frame.shift_by(evicted, keys.dtype, keys.device),
        )
        kv.state[SHIFT_KEY] = known
    keys[:, :, :n_sinks] = known[1].apply(pristine[:, :, pristine.shape[2] - n_sinks :])
    state[layer] = (pristine, evicted)


class Corrections:
    """``RopeFrame.correction`` of the last positions asked for. The layers of one forward get the
    same position tensors (the same objects), so the rotation is built once per forward, not once
    per layer; a match needs the same objects at the same version counters (an in-place change
    rebuilds it) and the same dtype. With ``wrap`` the positions wanted are taken modulo ``wrap``
    (InfiniAttention's segment frame: each token at its offset inside its segment)."""

    def __init__(self, frame: RopeFrame, wrap: int | None = None):
        self.frame = frame
        self.wrap = wrap
        self._last: tuple | None = None
        self._padded: tuple | None = None

    def padded(self, pos: torch.Tensor) -> bool:
        """Whether ``pos`` holds a padding slot (-1): read once per forward, matched as above."""
        last = self._padded
        if last is not None and last[0] is pos and last[1] == pos._version:
            return last[2]
        found = bool((pos < 0).any())
        self._padded = (pos, pos._version, found)
        return found

    def __call__(self, model_pos: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> Rotation:
        stamp = (model_pos._version, pos._version, dtype)
        last = self._last
        if last is not None and last[0] is model_pos and last[1] is pos and last[2] == stamp:
            return last[3]
        wanted = pos if self.wrap is None else pos.remainder(self.wrap)
        rotation = self.frame.correction(model_pos, wanted, dtype)
        self._last = (model_pos, pos, stamp, rotation)
        return rotation
