// Exact block-sparse attention on CPU over a padded (ELL) block index, in the style of ATen's CPU
// flash-attention kernel (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp): parallel over work
// items (batch, query head, query block); per visited key block S = Q K^T by a BLAS micro-kernel
// into a thread-local float tile, the element mask only where the block needs one, a vectorised
// online softmax (running max and sum, accumulator rescaled), and P V accumulated by a second GEMM.
//
// GEMMs: at::native::cpublas::brgemm (oneDNN's batch-reduce micro-kernel, exported by libtorch)
// for float32 (plain B) and bfloat16 (VNNI-packed B, fp32 accumulation); measured on the project's
// CPUs it runs the 128x128x64 tiles at ~112 (fp32) and ~215 (bf16) GFLOP/s per core, where MKL's
// sgemm reaches ~85. K (transposed) and, for bf16, V are packed once per call into O(T) buffers,
// the ragged last block zero-padded. float64 uses plain loops (correctness tests against the
// float64 oracle, not speed).
//
// Element masks, per visited slot (`kinds`):  -1 fully visible; -2 causal by position (key slot c
// of the block is visible from query row r iff kv_pos[c] <= q_pos[r]; the caller guarantees the
// block holds no padding and the rule equals its mask there); p >= 0: bytes of pair p in `masks`
// [Bm, Hm, P, bs, bs] (uint8; batch/head strides 0 when the mask broadcasts).
// A query row that sees no key gets out = 0 and lse = -inf.

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <mutex>
#include <vector>

#include "brgemm_probe.h"
#include "simd.h"

namespace {

struct Problem {
  int64_t B, H, Hkv, Tq, Tk, D, bs, nq, nkb, W, Bi, Hi;
  const int64_t* kv_blocks;  // [Bi, Hi, nq, W]
  const int64_t* counts;     // [Bi, Hi, nq]
  const int32_t* kinds;      // [Bi, Hi, nq, W]
  const uint8_t* masks;      // [Bm, Hm, P, bs, bs]
  int64_t mask_sb, mask_sh;  // element strides of the mask's batch and head (0: broadcast)
  const int64_t* q_pos;      // [Bp, Tq]
  const int64_t* kv_pos;     // [Bp, Tk]
  int64_t qpos_sb, kvpos_sb;  // Tq / Tk when Bp > 1, else 0
  double scale;
  bool skip;          // drop P V of (row, block) pairs below the running max minus skip_below
  float skip_below;   // lambda (scaled-score units), read only when skip
};

struct Item {
  int64_t cost, b, h, qb;
};

// Work items sorted by decreasing block count: threads pull them from an atomic counter, so the
// expensive query blocks start first and the cheap ones fill the tail (balanced for uneven counts).
std::vector<Item> make_items(const Problem& p) {
  std::vector<Item> items;
  items.reserve(p.B * p.H * p.nq);
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t h = 0; h < p.H; ++h)
      for (int64_t qb = 0; qb < p.nq; ++qb) {
        const int64_t row = ((p.Bi > 1 ? b : 0) * p.Hi + (p.Hi > 1 ? h : 0)) * p.nq + qb;
        items.push_back({p.counts[row], b, h, qb});
      }
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.cost > y.cost; });
  return items;
}

template <typename F>
void run_items(const std::vector<Item>& items, F&& body) {
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(items.size());
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      auto worker = body();  // per-thread buffers
      for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) worker(items[i]);
    }
  });
}

// Number of key slots c < ncols with kv_pos[c] <= qp (kv positions strictly increase in the block).
inline int64_t causal_limit(const int64_t* kp, int64_t ncols, int64_t qp) {
  return std::upper_bound(kp, kp + ncols, qp) - kp;
}

// Raw maximum of one block's segment of a score row, masking it in place first: masked entries
// and those past `limit` become -inf (raw scores; the softmax scale, > 0, is applied in the exp).
inline float segment_max(float* s, int64_t limit, int64_t width, const uint8_t* mask) {
  V vm = vset(NEG_INF);
  int64_t c = 0;
  for (; c + W <= limit; c += W) {
    V x = vload(s + c);
    if (mask) {
      x = vmask_bytes(x, mask + c);
      vstore(s + c, x);
    }
    vm = vmax(vm, x);
  }
  float mx = vhmax(vm);
  for (; c < limit; ++c) {
    if (mask && !mask[c]) s[c] = NEG_INF;
    mx = std::max(mx, s[c]);
  }
  std::fill(s + limit, s + width, NEG_INF);
  return mx;
}

// Probabilities of one score row (raw scores, -inf where masked) against the running maximum
// m_new (scaled): e = exp(scale * s - m_new), written as float into s or as bfloat16 into pb.
// Returns their sum. exp is simd.h's polynomial (about 1 ulp): ATen's exp_u20 (20 ulp) is faster
// but leaves fp32 outside the contract's error bound.
template <typename out_t>
inline float exp_row(float* s, out_t* pb, int64_t width, float scale, float m_new) {
  constexpr bool to_bf16 = std::is_same_v<out_t, at::BFloat16>;
  const V vscale = vset(scale), vneg_m = vset(-m_new);
  V vs = vzero();
  int64_t c = 0;
  for (; c + W <= width; c += W) {
    const V e = vexp(vfma(vload(s + c), vscale, vneg_m));
    if constexpr (to_bf16) vstore(pb + c, e);
    else vstore(s + c, e);
    vs = vadd(vs, e);
  }
  float sum = vsum(vs);
  for (; c < width; ++c) {
    const float e = std::exp(s[c] * scale - m_new);
    sum += e;
    if constexpr (to_bf16) pb[c] = at::BFloat16(e);
    else s[c] = e;
  }
  return sum;
}

// x[0:n] *= alpha
inline void scale_row(float* x, int64_t n, float alpha) {
  const V va = vset(alpha);
  int64_t i = 0;
  for (; i + W <= n; i += W) vstore(x + i, vmul(vload(x + i), va));
  for (; i < n; ++i) x[i] *= alpha;
}

struct SlotInfo {
  int64_t kb, ncols;
  int32_t kind;
};

inline SlotInfo slot_info(const Problem& p, int64_t row, int64_t s) {
  const int64_t kb = p.kv_blocks[row * p.W + s];
  return {kb, std::min(p.bs, p.Tk - kb * p.bs), p.kinds[row * p.W + s]};
}

// The mask bytes and prefix limit of row r for one visited slot.
inline const uint8_t* row_mask(const Problem& p, const SlotInfo& si, int64_t b, int64_t h,
                               int64_t r) {
  if (si.kind < 0) return nullptr;
  return p.masks + b * p.mask_sb + h * p.mask_sh + (si.kind * p.bs + r) * p.bs;
}

inline int64_t row_limit(const Problem& p, const SlotInfo& si, int64_t b, int64_t qrow) {
  if (si.kind != -2) return si.ncols;
  const int64_t* kp = p.kv_pos + b * p.kvpos_sb + si.kb * p.bs;
  return causal_limit(kp, si.ncols, p.q_pos[b * p.qpos_sb + qrow]);
}

template <typename scalar_t, typename acc_t>
void finalize(const Problem& p, const acc_t* acc, const acc_t* m_run, const acc_t* l_run,
              int64_t rows, scalar_t* out, acc_t* lse) {
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t l = l_run[r];
    for (int64_t d = 0; d < p.D; ++d)
      out[r * p.D + d] = static_cast<scalar_t>(l > 0 ? acc[r * p.D + d] / l : acc_t(0));
    lse[r] = l > 0 ? m_run[r] + std::log(l) : -std::numeric_limits<acc_t>::infinity();
  }
}

// float32 / bfloat16: brgemm tiles and the vectorised softmax, over chunks of up to CHUNK visited
// blocks at a time (one score tile [rows, CHUNK * bs], as ATen's kernel uses 512-key splits), so
// the per-row softmax bookkeeping is paid once per chunk rather than once per block.
constexpr int64_t CHUNK = 4;

// The thread-local buffers of one worker.
struct Tiles {
  std::vector<float> s, acc, stats, qf;
  std::vector<at::BFloat16> pb;
};

// q tile (rows x D) as the GEMM's type: itself, or widened to float into `qf` (bf16 inputs on a
// CPU whose brgemm has no bf16 micro-kernel).
template <typename scalar_t, typename io_t>
inline const scalar_t* q_tile(const io_t* qp, int64_t n, std::vector<float>& qf) {
  if constexpr (std::is_same_v<scalar_t, io_t>) {
    return qp;
  } else {
    float* d = qf.data();
    int64_t i = 0;
    for (; i + W <= n; i += W) vstore(d + i, vload(qp + i));
    for (; i < n; ++i) d[i] = static_cast<float>(qp[i]);
    return d;
  }
}

// Row maxima per block of one chunk row (masking in place), or of the whole row when no block
// needs a mask and no per-block maximum is asked for (`bmax` null).
inline float chunk_row_max(const Problem& p, const SlotInfo* si, int64_t n_blk, float* sr,
                           int64_t b, int64_t qrow, int64_t mb, int64_t mh, int64_t r,
                           bool any_mask, float* bmax) {
  const int64_t bs = p.bs;
  if (!any_mask && !bmax) return segment_max(sr, n_blk * bs, n_blk * bs, nullptr);
  float mx = NEG_INF;
  for (int64_t j = 0; j < n_blk; ++j) {
    const float m = segment_max(sr + j * bs, row_limit(p, si[j], b, qrow), bs,
                                row_mask(p, si[j], mb, mh, r));
    if (bmax) bmax[j] = m;
    mx = std::max(mx, m);
  }
  return mx;
}

template <typename scalar_t, typename io_t>
void run_fast(const Problem& p, const io_t* q, const scalar_t* kt, const scalar_t* v, io_t* out,
              float* lse) {
  constexpr bool bf16 = std::is_same_v<scalar_t, at::BFloat16>;
  const int64_t bs = p.bs, D = p.D, group = p.H / p.Hkv, ldw = CHUNK * bs;
  const float scale = static_cast<float>(p.scale);
  const auto items = make_items(p);
  run_items(items, [&]() {
    auto t = std::make_shared<Tiles>();
    t->s.resize(bs * ldw);
    t->pb.resize(bf16 ? bs * ldw : 0);
    t->acc.resize(bs * D);
    t->stats.resize(2 * bs);
    t->qf.resize(std::is_same_v<scalar_t, io_t> ? 0 : bs * D);
    return [&, t](const Item& it) {
      const int64_t b = it.b, h = it.h, qb = it.qb, hkv = h / group;
      const int64_t rows = std::min(bs, p.Tq - qb * bs);
      const int64_t row = ((p.Bi > 1 ? b : 0) * p.Hi + (p.Hi > 1 ? h : 0)) * p.nq + qb;
      const scalar_t* qp = q_tile<scalar_t>(q + ((b * p.H + h) * p.Tq + qb * bs) * D, rows * D, t->qf);
      float* s = t->s.data();
      scalar_t* pb = reinterpret_cast<scalar_t*>(t->pb.data());
      float* a = t->acc.data();
      float* m_run = t->stats.data();  // scaled running maxima
      float* l_run = m_run + bs;
      std::fill(a, a + rows * D, 0.0f);
      std::fill(m_run, m_run + rows, NEG_INF);
      std::fill(l_run, l_run + rows, 0.0f);
      const int64_t mb = p.mask_sb ? b : 0, mh = p.mask_sh ? h : 0;
      SlotInfo si[CHUNK];
      float bmax[CHUNK];
      int64_t dropped[CHUNK];  // rows whose P V of block j is skipped (skip_below)
      for (int64_t first = 0; first < it.cost; first += CHUNK) {
        const int64_t n_blk = std::min(CHUNK, it.cost - first);
        bool any_mask = false;
        for (int64_t j = 0; j < n_blk; ++j) {
          si[j] = slot_info(p, row, first + j);
          any_mask |= si[j].kind != -1 || si[j].ncols < bs;
          dropped[j] = 0;
          const scalar_t* kblk = kt + ((b * p.Hkv + hkv) * p.nkb + si[j].kb) * bs * D;
          // S[:, j*bs : (j+1)*bs] = Q K_j^T (K^T [D, bs]; bf16: VNNI [D/2, bs, 2])
          at::native::cpublas::brgemm(rows, bs, D, D, bs, ldw, false, qp, kblk, s + j * bs, bf16);
        }
        const int64_t width = n_blk * bs;
        for (int64_t r = 0; r < rows; ++r) {
          float* sr = s + r * ldw;
          const float mx = chunk_row_max(p, si, n_blk, sr, b, qb * bs + r, mb, mh, r, any_mask,
                                         p.skip ? bmax : nullptr);
          const float m_new = std::max(m_run[r], mx * scale);
          if (m_new == NEG_INF) {  // nothing visible yet in this row
            if constexpr (bf16) std::fill(pb + r * ldw, pb + r * ldw + width, scalar_t(0.0f));
            else std::fill(sr, sr + width, 0.0f);
            continue;
          }
          const float sum = exp_row<scalar_t>(sr, pb + r * ldw, width, scale, m_new);
          const float alpha = (m_run[r] == NEG_INF) ? 0.0f : std::exp(m_run[r] - m_new);
          if (alpha != 1.0f) scale_row(a + r * D, D, alpha);
          l_run[r] = l_run[r] * alpha + sum;  // skipped weights stay in the sum: lse is exact
          m_run[r] = m_new;
          if (!p.skip) continue;
          for (int64_t j = 0; j < n_blk; ++j) {
            if (!(bmax[j] * scale < m_new - p.skip_below)) continue;
            if constexpr (bf16) std::fill(pb + r * ldw + j * bs, pb + r * ldw + (j + 1) * bs,
                                          scalar_t(0.0f));
            else std::fill(sr + j * bs, sr + (j + 1) * bs, 0.0f);
            ++dropped[j];
          }
        }
        for (int64_t j = 0; j < n_blk; ++j) {
          if (dropped[j] == rows) continue;  // every row of the tile skips this block's P V
          if constexpr (bf16) {
            const scalar_t* vblk = v + ((b * p.Hkv + hkv) * p.nkb + si[j].kb) * bs * D;  // VNNI
            at::native::cpublas::brgemm(rows, D, bs, ldw, D, D, true, pb + j * bs, vblk, a, true);
          } else {
            const scalar_t* vblk = v + ((b * p.Hkv + hkv) * p.Tk + si[j].kb * bs) * D;  // [n, D]
            at::native::cpublas::brgemm(rows, D, si[j].ncols, ldw, D, D, true, s + j * bs, vblk, a,
                                        false);
          }
        }
      }
      finalize<io_t, float>(p, a, m_run, l_run, rows, out + ((b * p.H + h) * p.Tq + qb * bs) * D,
                            lse + (b * p.H + h) * p.Tq + qb * bs);
    };
  });
  at::native::cpublas::brgemm_release(bf16);
}

// float64: plain loops, two passes per query block (row maxima first, then exp and P V with no
// rescaling) in long double, so the result stays within a few ulp of the float64 oracle.
void run_double(const Problem& p, const double* q, const double* k, const double* v, double* out,
                double* lse) {
  using real = long double;
  const int64_t bs = p.bs, D = p.D, group = p.H / p.Hkv;
  const real ninf = -std::numeric_limits<real>::infinity();
  const auto items = make_items(p);
  run_items(items, [&]() {
    auto buf = std::make_shared<std::vector<real>>(bs * D + 2 * bs);
    return [&, buf](const Item& it) {
      const int64_t b = it.b, h = it.h, qb = it.qb, hkv = h / group;
      const int64_t rows = std::min(bs, p.Tq - qb * bs);
      const int64_t row = ((p.Bi > 1 ? b : 0) * p.Hi + (p.Hi > 1 ? h : 0)) * p.nq + qb;
      const double* qp = q + ((b * p.H + h) * p.Tq + qb * bs) * D;
      real *a = buf->data(), *m_run = a + bs * D, *l_run = m_run + bs;
      std::fill(a, a + rows * D, real(0));
      std::fill(m_run, m_run + rows, ninf);
      std::fill(l_run, l_run + rows, real(0));
      const int64_t mb = p.mask_sb ? b : 0, mh = p.mask_sh ? h : 0;
      for (int pass = 0; pass < 2; ++pass) {
        for (int64_t slot = 0; slot < it.cost; ++slot) {
          const SlotInfo si = slot_info(p, row, slot);
          const double* kp = k + ((b * p.Hkv + hkv) * p.Tk + si.kb * bs) * D;
          const double* vp = v + ((b * p.Hkv + hkv) * p.Tk + si.kb * bs) * D;
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t limit = row_limit(p, si, b, qb * bs + r);
            const uint8_t* mask = row_mask(p, si, mb, mh, r);
            for (int64_t c = 0; c < limit; ++c) {
              if (mask && !mask[c]) continue;
              real x = 0;
              for (int64_t d = 0; d < D; ++d) x += real(qp[r * D + d]) * real(kp[c * D + d]);
              x *= real(p.scale);
              if (pass == 0) {
                m_run[r] = std::max(m_run[r], x);
                continue;
              }
              const real e = std::exp(x - m_run[r]);
              l_run[r] += e;
              for (int64_t d = 0; d < D; ++d) a[r * D + d] += e * real(vp[c * D + d]);
            }
          }
        }
      }
      double* o = out + ((b * p.H + h) * p.Tq + qb * bs) * D;
      double* ls = lse + (b * p.H + h) * p.Tq + qb * bs;
      for (int64_t r = 0; r < rows; ++r) {
        const real l = l_run[r];
        for (int64_t d = 0; d < D; ++d) o[r * D + d] = l > 0 ? double(a[r * D + d] / l) : 0.0;
        ls[r] = l > 0 ? double(m_run[r] + std::log(l)) : -std::numeric_limits<double>::infinity();
      }
    };
  });
}

// K [B, Hkv, Tk, D] -> K^T per block [B, Hkv, nkb, D, bs] (bf16: VNNI [.., D/2, bs, 2]); V (bf16
// only) -> VNNI per block [B, Hkv, nkb, bs/2, D, 2]. The ragged last block is zero-padded.
template <typename scalar_t>
void pack_kv(const scalar_t* k, const scalar_t* v, scalar_t* kt, scalar_t* vp, int64_t BH,
             int64_t Tk, int64_t D, int64_t bs, int64_t nkb) {
  constexpr bool bf16 = std::is_same_v<scalar_t, at::BFloat16>;
  at::parallel_for(0, BH * nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / nkb, kb = i % nkb;
      const int64_t n = std::min(bs, Tk - kb * bs);
      const scalar_t* ks = k + (bh * Tk + kb * bs) * D;
      scalar_t* kd = kt + i * bs * D;
      if constexpr (bf16) {
        for (int64_t d2 = 0; d2 < D / 2; ++d2)
          for (int64_t c = 0; c < bs; ++c)
            for (int64_t e = 0; e < 2; ++e)
              kd[(d2 * bs + c) * 2 + e] = c < n ? ks[c * D + 2 * d2 + e] : scalar_t(0);
        const scalar_t* vs = v + (bh * Tk + kb * bs) * D;
        scalar_t* vd = vp + i * bs * D;
        for (int64_t c2 = 0; c2 < bs / 2; ++c2)
          for (int64_t d = 0; d < D; ++d)
            for (int64_t e = 0; e < 2; ++e) {
              const int64_t c = 2 * c2 + e;
              vd[(c2 * D + d) * 2 + e] = c < n ? vs[c * D + d] : scalar_t(0);
            }
      } else {
        for (int64_t d = 0; d < D; ++d)
          for (int64_t c = 0; c < bs; ++c) kd[d * bs + c] = c < n ? ks[c * D + d] : scalar_t(0);
      }
    }
  });
}

// bfloat16 K, V on a CPU whose brgemm has no bf16 micro-kernel: K^T per block widened to float
// [B, Hkv, nkb, D, bs] (as the float32 path packs it) and V widened to float [B, Hkv, Tk, D], once
// per call, so every visited tile runs the float32 micro-kernel without converting again (a
// block is visited by up to H / Hkv heads and many query blocks).
void pack_kv_upcast(const at::BFloat16* k, const at::BFloat16* v, float* kt, float* vf, int64_t BH,
                    int64_t Tk, int64_t D, int64_t bs, int64_t nkb) {
  at::parallel_for(0, BH * nkb, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t bh = i / nkb, kb = i % nkb;
      const int64_t n = std::min(bs, Tk - kb * bs);
      const at::BFloat16* ks = k + (bh * Tk + kb * bs) * D;
      float* kd = kt + i * bs * D;
      for (int64_t d = 0; d < D; ++d)
        for (int64_t c = 0; c < bs; ++c) kd[d * bs + c] = c < n ? float(ks[c * D + d]) : 0.0f;
      const int64_t off = (bh * Tk + kb * bs) * D, len = n * D;
      int64_t j = 0;
      for (; j + W <= len; j += W) vstore(vf + off + j, vload(v + off + j));
      for (; j < len; ++j) vf[off + j] = float(v[off + j]);
    }
  });
}

// The packed K (and V) of the last call, kept for the next one: a fresh multi-MB buffer per call
// page-faults on first touch (~20 ms for 64 MiB here); a reused one does not. Calls are serialised
// by the mutex (the GIL is held anyway).
std::mutex workspace_mutex;

at::Tensor& workspace() {
  static at::Tensor buffer;
  return buffer;
}

template <typename scalar_t>
scalar_t* workspace_ptr(int64_t numel) {
  at::Tensor& buffer = workspace();
  const int64_t bytes = numel * static_cast<int64_t>(sizeof(scalar_t));
  if (!buffer.defined() || buffer.numel() < bytes) buffer = at::empty({bytes}, at::kByte);
  return reinterpret_cast<scalar_t*>(buffer.data_ptr<uint8_t>());
}

std::vector<at::Tensor> forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                const at::Tensor& kv_blocks, const at::Tensor& counts,
                                const at::Tensor& kinds, const at::Tensor& masks, int64_t mask_sb,
                                int64_t mask_sh, const at::Tensor& q_pos, const at::Tensor& kv_pos,
                                int64_t block_size, double scale, double skip_below,
                                bool bf16_upcast) {
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous(), "q, k, v contiguous");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type());
  TORCH_CHECK(kv_blocks.is_contiguous() && counts.is_contiguous() && kinds.is_contiguous() &&
              masks.is_contiguous() && q_pos.is_contiguous() && kv_pos.is_contiguous());
  TORCH_CHECK(kv_blocks.scalar_type() == at::kLong && counts.scalar_type() == at::kLong &&
              kinds.scalar_type() == at::kInt && masks.scalar_type() == at::kByte &&
              q_pos.scalar_type() == at::kLong && kv_pos.scalar_type() == at::kLong);
  // The Python wrapper validates its inputs; these checks keep a direct call from reading out of
  // bounds (the index contents, block ids in range, are the wrapper's `validate`).
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && k.sizes() == v.sizes() && k.size(0) == q.size(0) &&
                  k.size(3) == q.size(3) && k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
              "block_sparse: q [B, H, Tq, D] and k, v [B, Hkv, Tk, D] with H a multiple of Hkv");
  TORCH_CHECK(block_size >= 1 && kv_blocks.dim() == 4 && kinds.sizes() == kv_blocks.sizes() &&
                  counts.dim() == 3 && counts.sizes() == kv_blocks.sizes().slice(0, 3) &&
                  (kv_blocks.size(0) == 1 || kv_blocks.size(0) == q.size(0)) &&
                  (kv_blocks.size(1) == 1 || kv_blocks.size(1) == q.size(1)),
              "block_sparse: kv_blocks / kinds [Bi, Hi, nq, W] and counts [Bi, Hi, nq]");
  TORCH_CHECK(masks.dim() == 5, "block_sparse: masks [Bm, Hm, P, bs, bs]");
  for (const auto& [pos, len] : {std::pair{&q_pos, q.size(2)}, std::pair{&kv_pos, k.size(2)}})
    TORCH_CHECK(pos->dim() == 2 && pos->size(1) == len &&
                    (pos->size(0) == 1 || pos->size(0) == q.size(0)),
                "block_sparse: positions [1 or B, T], got ", pos->sizes(), " for T = ", len);
  Problem p{};
  p.B = q.size(0);
  p.H = q.size(1);
  p.Tq = q.size(2);
  p.D = q.size(3);
  p.Hkv = k.size(1);
  p.Tk = k.size(2);
  p.bs = block_size;
  p.nq = kv_blocks.size(2);
  p.nkb = (p.Tk + p.bs - 1) / p.bs;
  p.W = kv_blocks.size(3);
  p.Bi = kv_blocks.size(0);
  p.Hi = kv_blocks.size(1);
  TORCH_CHECK(p.H % p.Hkv == 0 && p.nq == (p.Tq + p.bs - 1) / p.bs);
  p.kv_blocks = kv_blocks.data_ptr<int64_t>();
  p.counts = counts.data_ptr<int64_t>();
  p.kinds = kinds.data_ptr<int32_t>();
  p.masks = masks.data_ptr<uint8_t>();
  p.mask_sb = mask_sb;
  p.mask_sh = mask_sh;
  p.q_pos = q_pos.data_ptr<int64_t>();
  p.kv_pos = kv_pos.data_ptr<int64_t>();
  p.qpos_sb = q_pos.size(0) > 1 ? p.Tq : 0;
  p.kvpos_sb = kv_pos.size(0) > 1 ? p.Tk : 0;
  p.scale = scale;
  p.skip = std::isfinite(skip_below);
  p.skip_below = static_cast<float>(skip_below);
  auto out = at::empty_like(q);
  const auto st = q.scalar_type();
  if (st == at::kDouble) {
    TORCH_CHECK(!p.skip, "block_sparse: skip_below runs in float32 / bfloat16 only");
    auto lse = at::empty({p.B, p.H, p.Tq}, q.options());
    run_double(p, q.data_ptr<double>(), k.data_ptr<double>(), v.data_ptr<double>(),
               out.data_ptr<double>(), lse.data_ptr<double>());
    return {out, lse};
  }
  auto lse = at::empty({p.B, p.H, p.Tq}, q.options().dtype(at::kFloat));
  const int64_t BH = p.B * p.Hkv, padded = BH * p.nkb * p.bs * p.D;
  std::lock_guard<std::mutex> guard(workspace_mutex);
  if (st == at::kFloat) {
    float* kt = workspace_ptr<float>(padded);
    pack_kv<float>(k.data_ptr<float>(), nullptr, kt, nullptr, BH, p.Tk, p.D, p.bs, p.nkb);
    run_fast<float, float>(p, q.data_ptr<float>(), kt, v.data_ptr<float>(), out.data_ptr<float>(),
                    lse.data_ptr<float>());
  } else if (st == at::kBFloat16) {
    using bf = at::BFloat16;
    if (bf16_upcast) {
      float* kt = workspace_ptr<float>(2 * padded);
      float* vf = kt + padded;
      pack_kv_upcast(k.data_ptr<bf>(), v.data_ptr<bf>(), kt, vf, BH, p.Tk, p.D, p.bs, p.nkb);
      run_fast<float, bf>(p, q.data_ptr<bf>(), kt, vf, out.data_ptr<bf>(), lse.data_ptr<float>());
      return {out, lse};
    }
    TORCH_CHECK(p.D % 2 == 0 && p.bs % 2 == 0, "bfloat16 needs an even head dim and block size");
    bf* kt = workspace_ptr<bf>(2 * padded);
    bf* vp = kt + padded;
    pack_kv<bf>(k.data_ptr<bf>(), v.data_ptr<bf>(), kt, vp, BH, p.Tk, p.D, p.bs, p.nkb);
    run_fast<bf, bf>(p, q.data_ptr<bf>(), kt, vp, out.data_ptr<bf>(), lse.data_ptr<float>());
  } else {
    TORCH_CHECK(false, "block_sparse: unsupported dtype ", st);
  }
  return {out, lse};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "block-sparse attention forward: (out, lse)");
  m.def(
      "release",
      []() {
        std::lock_guard<std::mutex> guard(workspace_mutex);
        workspace() = at::Tensor();
      },
      "free the packed-K/V workspace kept between calls");
  m.def("probe", &probe, "empty string when brgemm runs the dtype, else the reason");
  m.attr("avx512") = static_cast<bool>(LA_AVX512);
  m.attr("avx2") = static_cast<bool>(LA_AVX2);
}
