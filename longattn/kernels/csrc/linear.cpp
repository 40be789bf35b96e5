// Causal chunkwise linear attention on CPU, float32, in the style of Lightning Attention's
// intra/inter split (arXiv:2401.04658): parallel over (batch, KV head); per chunk of C tokens the
// KV head's query heads compute P = Q K^T (masked causal, times gamma^(i-j) with a fixed decay),
// O = P V + diag(gamma^(i+1)) Q S, with the carried state S [F, Dv] and the normaliser's running
// key sum z [F]; then S = gamma^C S + (gamma^(C-1-j) K)^T V. Every product is a BLAS micro-kernel
// call (at::native::cpublas::brgemm, oneDNN's batch-reduce GEMM exported by libtorch) on tiles that
// stay in cache, so no [T, C] or [T, F, Dv] intermediate ever reaches memory: the time is the
// GEMMs'. Transitions other than none / a fixed per-head decay run the PyTorch path.

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Problem {
  int64_t B, H, Hkv, T, F, Dv, C;
  bool normalize;
};

// One (batch, KV head): all its chunks in order, its G query heads per chunk.
void run_item(const Problem& p, int64_t b, int64_t hkv, const float* q, const float* k,
              const float* v, float* out, float* S, float* z, const float* powers,
              std::vector<float>& buf) {
  const int64_t C = p.C, F = p.F, Dv = p.Dv, G = p.H / p.Hkv;
  float* kt = buf.data();          // K^T of the chunk [F, C]
  float* ktd = kt + F * C;         // K^T decayed to the chunk's end [F, C]
  float* P = ktd + F * C;          // [C, C]
  float* O = P + C * C;            // [C, Dv]
  float* qd = O + C * Dv;          // decayed query rows [C, F]
  float* den = qd + C * F;         // [C]
  const bool decay = powers != nullptr;
  const float* kbase = k + (b * p.Hkv + hkv) * p.T * F;
  const float* vbase = v + (b * p.Hkv + hkv) * p.T * Dv;
  for (int64_t t0 = 0; t0 < p.T; t0 += C) {
    const int64_t rows = std::min(C, p.T - t0);
    const float* kp = kbase + t0 * F;
    const float* vp = vbase + t0 * Dv;
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t f = 0; f < F; ++f) kt[f * C + j] = kp[j * F + f];
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hkv * G + g;
      const float* qp = q + ((b * p.H + h) * p.T + t0) * F;
      at::native::cpublas::brgemm(rows, rows, F, F, C, C, false, qp, kt, P, false);
      for (int64_t i = 0; i < rows; ++i) {
        float* pr = P + i * C;
        if (decay)
          for (int64_t j = 0; j <= i; ++j) pr[j] *= powers[i - j];
        std::fill(pr + i + 1, pr + rows, 0.0f);
        if (p.normalize) {
          float s = 0.0f;
          for (int64_t j = 0; j <= i; ++j) s += pr[j];
          den[i] = s;
        }
      }
      at::native::cpublas::brgemm(rows, Dv, rows, C, Dv, Dv, false, P, vp, O, false);
      const float* qa = qp;
      if (decay) {
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t f = 0; f < F; ++f) qd[i * F + f] = qp[i * F + f] * powers[i + 1];
        qa = qd;
      }
      at::native::cpublas::brgemm(rows, Dv, F, F, Dv, Dv, true, qa, S, O, false);
      float* op = out + ((b * p.H + h) * p.T + t0) * Dv;
      for (int64_t i = 0; i < rows; ++i) {
        if (!p.normalize) {
          std::copy(O + i * Dv, O + (i + 1) * Dv, op + i * Dv);
          continue;
        }
        float s = den[i];
        for (int64_t f = 0; f < F; ++f) s += qa[i * F + f] * z[f];
        const float inv = s == 0.0f ? 0.0f : 1.0f / s;
        for (int64_t d = 0; d < Dv; ++d) op[i * Dv + d] = s == 0.0f ? 0.0f : O[i * Dv + d] * inv;
      }
    }
    const float* kd = kt;
    if (decay) {
      const float whole = powers[rows];
      for (int64_t e = 0; e < F * Dv; ++e) S[e] *= whole;
      if (p.normalize)
        for (int64_t f = 0; f < F; ++f) z[f] *= whole;
      for (int64_t f = 0; f < F; ++f)
        for (int64_t j = 0; j < rows; ++j) ktd[f * C + j] = kt[f * C + j] * powers[rows - 1 - j];
      kd = ktd;
    }
    at::native::cpublas::brgemm(F, Dv, rows, C, Dv, Dv, true, kd, vp, S, false);
    if (p.normalize)
      for (int64_t f = 0; f < F; ++f) {
        float s = 0.0f;
        for (int64_t j = 0; j < rows; ++j) s += kd[f * C + j];
        z[f] += s;
      }
  }
}

// q [B, H, T, F], k [B, Hkv, T, F], v [B, Hkv, T, Dv] float32 contiguous; kv [B, Hkv, F, Dv] and
// k_sum [B, Hkv, F] (empty when not normalising) the carried state, updated in place;
// log_gamma [Hkv] float64 (empty: no decay). Returns out [B, H, T, Dv] float32.
torch::Tensor forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                      torch::Tensor kv, torch::Tensor k_sum, const torch::Tensor& log_gamma,
                      int64_t chunk, bool normalize) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat && kv.scalar_type() == at::kFloat,
              "linear kernel: float32 tensors expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && kv.is_contiguous(),
              "linear kernel: contiguous tensors expected");
  Problem p{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), v.size(3), chunk, normalize};
  TORCH_CHECK(!normalize || (k_sum.is_contiguous() && k_sum.numel() == p.B * p.Hkv * p.F),
              "linear kernel: k_sum [B, Hkv, F] expected");
  auto out = torch::empty({p.B, p.H, p.T, p.Dv}, q.options());
  const bool decay = log_gamma.numel() > 0;
  std::vector<float> powers(decay ? p.Hkv * (p.C + 1) : 0);  // gamma_h^i, i = 0..C
  for (int64_t h = 0; decay && h < p.Hkv; ++h)
    for (int64_t i = 0; i <= p.C; ++i)
      powers[h * (p.C + 1) + i] =
          static_cast<float>(std::exp(static_cast<double>(i) * log_gamma[h].item<double>()));
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *op = out.data_ptr<float>(), *sp = kv.data_ptr<float>();
  float* zp = normalize ? k_sum.data_ptr<float>() : nullptr;
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * p.F * p.C + p.C * p.C + p.C * p.Dv + p.C * p.F + p.C);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / p.Hkv, h = item % p.Hkv;
      run_item(p, b, h, qp, kp, vp, op, sp + item * p.F * p.Dv, zp ? zp + item * p.F : nullptr,
               decay ? powers.data() + h * (p.C + 1) : nullptr, buf);
    }
    at::native::cpublas::brgemm_release(false);
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "causal chunkwise linear attention, float32 (see linear.cpp)");
}
