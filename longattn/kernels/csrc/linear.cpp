// Causal chunkwise linear attention on CPU (float32 / bfloat16 inputs, float32 accumulation), in
// the style of Lightning Attention's intra/inter split (arXiv:2401.04658): parallel over (batch,
// KV head); per chunk of C tokens the KV head's query heads compute P = Q K^T (masked causal, times
// gamma^(i-j) with a fixed decay), O = P V + diag(gamma^(i+1)) Q S, with the carried state
// S [F, Dv] and the normaliser's running key sum z [F]; then S = gamma^C S + (gamma^(C-1-j) K)^T V.
// Every product is a BLAS micro-kernel call (at::native::cpublas::brgemm, oneDNN's batch-reduce
// GEMM exported by libtorch) on tiles that stay in cache, so no [T, C] or [T, F, Dv] intermediate
// ever reaches memory: the time is the GEMMs'. Transitions other than none / a fixed per-head
// decay run the PyTorch path.

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace {

struct Problem {
  int64_t B, H, Hkv, T, F, Dv, C;
  bool normalize;
};

// A [rows, n] tile as float: the pointer itself for float32, else widened into `buf`.
template <typename io_t>
inline const float* widen(const io_t* src, int64_t count, float* buf) {
  if constexpr (std::is_same_v<io_t, float>) {
    return src;
  } else {
    for (int64_t i = 0; i < count; ++i) buf[i] = static_cast<float>(src[i]);
    return buf;
  }
}

// One (batch, KV head): all its chunks in order, its G query heads per chunk. bfloat16 tiles are
// widened to float in cache as they are read (the float32 micro-kernel runs them: this CPU class's
// bf16 GEMM is no faster), so no widened copy of q, k, v is ever made in memory.
template <typename io_t>
void run_item(const Problem& p, int64_t b, int64_t hkv, const io_t* q, const io_t* k,
              const io_t* v, io_t* out, float* S, float* z, const float* powers,
              std::vector<float>& buf) {
  const int64_t C = p.C, F = p.F, Dv = p.Dv, G = p.H / p.Hkv;
  float* kt = buf.data();          // K^T of the chunk [F, C]
  float* ktd = kt + F * C;         // K^T decayed to the chunk's end [F, C]
  float* P = ktd + F * C;          // [C, C]
  float* O = P + C * C;            // [C, Dv]
  float* qd = O + C * Dv;          // decayed query rows [C, F]
  float* den = qd + C * F;         // [C]
  float* qw = den + C;             // widened query rows [C, F] (bfloat16)
  float* vw = qw + C * F;          // widened values [C, Dv] (bfloat16)
  const bool decay = powers != nullptr;
  const io_t* kbase = k + (b * p.Hkv + hkv) * p.T * F;
  const io_t* vbase = v + (b * p.Hkv + hkv) * p.T * Dv;
  for (int64_t t0 = 0; t0 < p.T; t0 += C) {
    const int64_t rows = std::min(C, p.T - t0);
    const io_t* kp = kbase + t0 * F;
    const float* vp = widen(vbase + t0 * Dv, rows * Dv, vw);
    for (int64_t j = 0; j < rows; ++j)
      for (int64_t f = 0; f < F; ++f) kt[f * C + j] = static_cast<float>(kp[j * F + f]);
    for (int64_t g = 0; g < G; ++g) {
      const int64_t h = hkv * G + g;
      const float* qp = widen(q + ((b * p.H + h) * p.T + t0) * F, rows * F, qw);
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
      io_t* op = out + ((b * p.H + h) * p.T + t0) * Dv;
      for (int64_t i = 0; i < rows; ++i) {
        float scale = 1.0f;
        if (p.normalize) {
          float s = den[i];
          for (int64_t f = 0; f < F; ++f) s += qa[i * F + f] * z[f];
          scale = s == 0.0f ? 0.0f : 1.0f / s;  // a row with a zero denominator gives 0
        }
        for (int64_t d = 0; d < Dv; ++d) op[i * Dv + d] = static_cast<io_t>(O[i * Dv + d] * scale);
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

// Ask for transparent huge pages on a large fresh output before its first touch: a 128K-token
// output is 256 MiB, and faulting it in 4 KiB pages cost a fifth of the kernel's time at that
// length (measured), which made the time grow faster than T. Only the hint: where the kernel
// (or its THP setting) says no, nothing changes.
void advise_huge_pages(torch::Tensor& out) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t huge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t end = begin + out.nbytes();
  const uintptr_t first = (begin + huge - 1) & ~(huge - 1), last = end & ~(huge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)out;
#endif
}

template <typename io_t>
void run_all(const Problem& p, const torch::Tensor& q, const torch::Tensor& k,
             const torch::Tensor& v, torch::Tensor& out, float* sp, float* zp,
             const std::vector<float>& powers) {
  const io_t *qp = q.data_ptr<io_t>(), *kp = k.data_ptr<io_t>(), *vp = v.data_ptr<io_t>();
  io_t* op = out.data_ptr<io_t>();
  const bool decay = !powers.empty();
  at::parallel_for(0, p.B * p.Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(2 * p.F * p.C + p.C * p.C + p.C * p.Dv + 2 * p.C * p.F + p.C +
                           p.C * p.Dv);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / p.Hkv, h = item % p.Hkv;
      run_item<io_t>(p, b, h, qp, kp, vp, op, sp + item * p.F * p.Dv,
                     zp ? zp + item * p.F : nullptr,
                     decay ? powers.data() + h * (p.C + 1) : nullptr, buf);
    }
    at::native::cpublas::brgemm_release(false);
  });
}

// q [B, H, T, F], k [B, Hkv, T, F], v [B, Hkv, T, Dv] float32 or bfloat16 (one dtype),
// contiguous; kv [B, Hkv, F, Dv] and k_sum [B, Hkv, F] float32 (k_sum empty when not
// normalising) the carried state, updated in place; log_gamma [Hkv] float64 (empty: no decay).
// Returns out [B, H, T, Dv] in the inputs' dtype.
torch::Tensor forward(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                      torch::Tensor kv, torch::Tensor k_sum, const torch::Tensor& log_gamma,
                      int64_t chunk, bool normalize) {
  const auto dtype = q.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && k.scalar_type() == dtype &&
                  v.scalar_type() == dtype && kv.scalar_type() == at::kFloat,
              "linear kernel: float32 / bfloat16 q, k, v and a float32 state expected");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && kv.is_contiguous(),
              "linear kernel: contiguous tensors expected");
  Problem p{q.size(0), q.size(1), k.size(1), q.size(2), q.size(3), v.size(3), chunk, normalize};
  TORCH_CHECK(!normalize || (k_sum.is_contiguous() && k_sum.numel() == p.B * p.Hkv * p.F),
              "linear kernel: k_sum [B, Hkv, F] expected");
  auto out = torch::empty({p.B, p.H, p.T, p.Dv}, q.options());
  if (out.nbytes() >= (size_t(8) << 20)) advise_huge_pages(out);
  const bool decay = log_gamma.numel() > 0;
  std::vector<float> powers(decay ? p.Hkv * (p.C + 1) : 0);  // gamma_h^i, i = 0..C
  for (int64_t h = 0; decay && h < p.Hkv; ++h)
    for (int64_t i = 0; i <= p.C; ++i)
      powers[h * (p.C + 1) + i] =
          static_cast<float>(std::exp(static_cast<double>(i) * log_gamma[h].item<double>()));
  float* sp = kv.data_ptr<float>();
  float* zp = normalize ? k_sum.data_ptr<float>() : nullptr;
  if (dtype == at::kFloat)
    run_all<float>(p, q, k, v, out, sp, zp, powers);
  else
    run_all<at::BFloat16>(p, q, k, v, out, sp, zp, powers);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "causal chunkwise linear attention, float32 (see linear.cpp)");
}
