"""Can Performer's random features be rescued on SmolLM2's q/k by transformations that leave
softmax attention unchanged? Relative error |out - softmax|_F / |softmax|_F of causal Performer
(float64, 128 orthogonal features, seed 0) on q/k/v captured from 7 layers at 2,048 tokens of
pydoc text, per variant:

- ``base``: the features of q and k as they are;
- ``ck``: keys centred (k - mean_s k_s per head): ``q . mean(k)`` is one constant per query,
  which softmax ignores;
- ``ck+b``: and q, k rescaled by ``a``, ``1 / a`` (a^4 = mean |k|^2 / mean |q|^2), which leaves
  every ``q . k`` as it is and balances the norms the estimator's variance grows with;
- ``ckq``: keys centred and queries centred too, ``exp(q . k) = exp((q - mean q) . k)
  exp(mean(q) . k)``, the second factor an exact per-key weight folded into the key's features;
- ``ckq+b``: both, and balanced;
- ``mean-v``: no attention at all, the running mean of the values (the uninformative baseline).

    PYTHONPATH=. OMP_NUM_THREADS=1 python docs/runs/issue16/performer_centering.py
"""

import torch

from longattn.bench.common import cpu_line
from longattn.eval import models, tasks
from longattn.integrations.hf import capture_qkv
from longattn.methods.performer import orthogonal_features

LAYERS = [2, 6, 10, 14, 18, 22, 26]
VARIANTS = {
    "base": {}, "ck": dict(center_k=True), "ck+b": dict(center_k=True, balance=True),
    "ckq": dict(center_k=True, center_q=True),
    "ckq+b": dict(center_k=True, center_q=True, balance=True),
}  # fmt: skip


def softmax_out(q, k, v):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    causal = torch.ones(q.shape[2], q.shape[2], dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, -torch.inf), -1) @ v


def performer_out(q, k, v, m=128, center_k=False, center_q=False, balance=False):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    dim = q.shape[-1]
    q, k = q * dim**-0.25, k * dim**-0.25
    key_weight = torch.zeros(k.shape[:3], dtype=q.dtype)
    if center_k:
        k = k - k.mean(2, keepdim=True)
    if center_q:
        q_mean = q.mean(2, keepdim=True)
        key_weight = key_weight + (q_mean * k).sum(-1)
        q = q - q_mean
    if balance:
        ratio = k.pow(2).sum(-1).mean(2, keepdim=True) / q.pow(2).sum(-1).mean(2, keepdim=True)
        a = ratio.pow(0.25)[..., None]
        q, k = q * a, k / a
    w = orthogonal_features(0, 0, 0, dim, m)
    lq = q @ w.T - 0.5 * (q * q).sum(-1, keepdim=True)
    lk = k @ w.T - 0.5 * (k * k).sum(-1, keepdim=True) + key_weight[..., None]
    phi_q = (lq - lq.amax(-1, keepdim=True)).exp()
    phi_k = (lk - lk.amax(-1, keepdim=True).amax(2, keepdim=True)).exp()
    kern = (phi_q @ phi_k.transpose(-1, -2)).tril()
    return (kern @ v) / kern.sum(-1, keepdim=True)


def main() -> None:
    model, tokenizer = models.load("smollm2-135m")
    ids = torch.tensor([tasks.text_window(tokenizer, "pydoc", 2048, 0)])
    captured = capture_qkv(model, ids, layers=LAYERS)
    print(f"CPU: {cpu_line()}")
    print("| layer | " + " | ".join(VARIANTS) + " | mean-v |")
    print("|---" * (len(VARIANTS) + 2) + "|")
    for layer, (q, k, v) in captured.items():
        q, k, v = (t.double() for t in (q, k, v))
        ref = softmax_out(q, k, v)
        errs = [float((performer_out(q, k, v, **kw) - ref).norm() / ref.norm()) for kw in
                VARIANTS.values()]  # fmt: skip
        group = q.shape[1] // v.shape[1]
        running = v.repeat_interleave(group, 1).cumsum(2) / torch.arange(1, q.shape[2] + 1)[:, None]
        errs.append(float((running - ref).norm() / ref.norm()))
        print(f"| {layer} | " + " | ".join(f"{e:.3f}" for e in errs) + " |", flush=True)


if __name__ == "__main__":
    main()
