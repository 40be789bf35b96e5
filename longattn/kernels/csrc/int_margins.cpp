// Block margins from low-precision products (SALE's estimate) on CPU: for every causal pair of a
// query block and a key block, the best estimated score against the row's anchor over the block's
// visible pairs,
//
//   margin[b, h, qb, kb] = max over rows i of qb, keys j of kb of  P_ij * c - anchor_i,
//   c = (q_scale[b, h, qb] * k_scale[b, hkv, kb]) * scale   (float32, in that order),
//
// P_ij the integer product of the quantised query row i and key row j. The products are exact
// 32-bit integers from the AVX-512 VNNI byte dot product (vpdpbusd: 64 byte products a
// instruction, 4x the float32 FMA rate); no product matrix is stored. The scales are positive, so
// the row's best product per key block is taken first and scaled after, in float32 with the
// float32 roundings of the PyTorch definition (longattn.methods.sale.SALE.margins): the two
// give bit-identical margins.
//
// vpdpbusd multiplies unsigned by signed bytes: the keys are packed as k + 128 (1 .. 255), and a
// row's best sum(q_d (k_d + 128)) less 128 sum(q_d) is its best q . k (exact: |sums| < 2^31).
//
// A key block is "full" (causal_full: every pair visible; rows of padding, q_pos < 0, are left
// out) or an edge (causal, not full: each pair visible when 0 <= kv_pos <= q_pos); other blocks
// get -inf, as does a block none of whose pairs is visible.
//
// Layout: q8 [B, H, nq * bs, D4] and k8 [B, Hkv, nk * bs, D4] int8, contiguous, D4 a multiple of 4
// (zero-padded); q_scale [B, H, nq], k_scale [B, Hkv, nk], anchor [B, H, nq * bs] float32;
// q_pos [Bp, nq * bs], kv_pos [Bp, nk * bs] int64 (-1: padding); causal, full [nq, nk] bool.
// Work items are (query block, batch row, head), the query blocks taken from both ends in turn so
// that a thread's share of the causal triangle is balanced.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define LA_VNNI 1
#include <immintrin.h>
#else
#define LA_VNNI 0
#endif

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
constexpr int LANES = 16;  // keys of a packed vector

#if LA_VNNI
// best * c - anchor with both roundings of the definition (two float32 operations, which the
// compiler would otherwise be free to contract into one fused multiply-add)
inline float margin_of(float best, float c, float anchor) {
  float scaled = best * c;
  asm volatile("" : "+v"(scaled));
  return scaled - anchor;
}

struct Problem {
  int64_t B, H, Hkv, nq, nk, bs, d4, nvec, quads;
  const int8_t* q8;
  const float* q_scale;
  const float* k_scale;
  const float* anchor;
  const int64_t* q_pos;
  const int64_t* kv_pos;
  int64_t qpsB, kpsB;
  const bool* causal;
  const bool* full;
  float scale;
  const uint8_t* packed;  // [B, Hkv, nk, quads, nvec, 64] keys + 128, key-interleaved
  int64_t block_bytes;    // quads * nvec * 64
  float* out;
};

// Key block kb of (b, hkv): for each quad of head-dim elements d4 and each vector of 16 keys, the
// 16 keys' 4 bytes in key order (vpdpbusd's layout), + 128; keys past bs are 128 (zero keys).
void pack_block(const int8_t* k8, int64_t bs, int64_t d4, int64_t nvec, uint8_t* dst) {
  const int64_t quads = d4 / 4;
  for (int64_t dq = 0; dq < quads; ++dq) {
    for (int64_t v = 0; v < nvec; ++v) {
      uint8_t* vec = dst + (dq * nvec + v) * 64;
      for (int64_t l = 0; l < LANES; ++l) {
        const int64_t key = v * LANES + l;
        for (int64_t e = 0; e < 4; ++e) {
          const int8_t x = key < bs ? k8[key * d4 + dq * 4 + e] : 0;
          vec[l * 4 + e] = static_cast<uint8_t>(static_cast<int>(x) + 128);
        }
      }
    }
  }
}

// acc[r][v] = sum_d q_r[d] (k_{v * 16 + lane}[d] + 128) for RB rows and NV key vectors from v0.
template <int RB, int NV>
inline void products(const Problem& P, const int32_t* const* qrow, const uint8_t* block,
                     int64_t v0, __m512i acc[RB][NV]) {
  for (int r = 0; r < RB; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_si512();
  for (int64_t dq = 0; dq < P.quads; ++dq) {
    __m512i kv[NV];
    const uint8_t* base = block + (dq * P.nvec + v0) * 64;
    for (int v = 0; v < NV; ++v) kv[v] = _mm512_loadu_si512(base + v * 64);
    for (int r = 0; r < RB; ++r) {
      const __m512i qb = _mm512_set1_epi32(qrow[r][dq]);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbusd_epi32(acc[r][v], kv[v], qb);
    }
  }
}

inline __mmask16 lanes_of(const Problem& P, int64_t v) {
  const int64_t n = std::min<int64_t>(LANES, P.bs - v * LANES);
  return n >= LANES ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// best[r] = max over the block's keys of the offset products of RB rows (a full block).
template <int RB, int NV>
inline void full_rows(const Problem& P, const int32_t* const* qrow, const uint8_t* block,
                      int64_t v0, __m512i best[RB]) {
  __m512i acc[RB][NV];
  products<RB, NV>(P, qrow, block, v0, acc);
  for (int v = 0; v < NV; ++v) {
    const __mmask16 m = lanes_of(P, v0 + v);
    for (int r = 0; r < RB; ++r) best[r] = _mm512_mask_max_epi32(best[r], m, best[r], acc[r][v]);
  }
}

template <int RB>
void full_block(const Problem& P, const int32_t* const* qrow, const uint8_t* block,
                int32_t* row_best) {
  __m512i best[RB];
  for (int r = 0; r < RB; ++r) best[r] = _mm512_set1_epi32(std::numeric_limits<int32_t>::min());
  int64_t v = 0;
  for (; v + 4 <= P.nvec; v += 4) full_rows<RB, 4>(P, qrow, block, v, best);
  switch (P.nvec - v) {
    case 3: full_rows<RB, 3>(P, qrow, block, v, best); break;
    case 2: full_rows<RB, 2>(P, qrow, block, v, best); break;
    case 1: full_rows<RB, 1>(P, qrow, block, v, best); break;
    default: break;
  }
  for (int r = 0; r < RB; ++r) row_best[r] = _mm512_reduce_max_epi32(best[r]);
}

// One row's offset products with every key of the block, into prod[0 .. nvec * 16).
void row_products(const Problem& P, const int32_t* qrow, const uint8_t* block, int32_t* prod) {
  const int32_t* rows[1] = {qrow};
  for (int64_t v = 0; v < P.nvec; ++v) {
    __m512i acc[1][1];
    products<1, 1>(P, rows, block, v, acc);
    _mm512_storeu_si512(prod + v * LANES, acc[0][0]);
  }
}

// Query block qb of (b, h): its margins against every key block.
void run_item(const Problem& P, int64_t b, int64_t h, int64_t qb, std::vector<int32_t>& prod,
              std::vector<int32_t>& row_best) {
  const int64_t bs = P.bs, G = P.H / P.Hkv, hkv = h / G;
  const int64_t row0 = qb * bs;
  const int8_t* q = P.q8 + ((b * P.H + h) * P.nq * bs + row0) * P.d4;
  const int64_t* qp = P.q_pos + b * P.qpsB + row0;
  const float* anchor = P.anchor + (b * P.H + h) * P.nq * bs + row0;
  const float qs = P.q_scale[(b * P.H + h) * P.nq + qb];
  const float* ks = P.k_scale + (b * P.Hkv + hkv) * P.nk;
  const int64_t* kp_row = P.kv_pos + b * P.kpsB;
  float* out = P.out + ((b * P.H + h) * P.nq + qb) * P.nk;
  // the rows as 32-bit words of 4 bytes, and each row's offset 128 sum(q)
  std::vector<const int32_t*> rows(bs);
  std::vector<int32_t> offset(bs);
  for (int64_t i = 0; i < bs; ++i) {
    rows[i] = reinterpret_cast<const int32_t*>(q + i * P.d4);
    int32_t s = 0;
    for (int64_t d = 0; d < P.d4; ++d) s += q[i * P.d4 + d];
    offset[i] = 128 * s;
  }
  for (int64_t kb = 0; kb < P.nk; ++kb) {
    out[kb] = NEG_INF;
    if (!P.causal[qb * P.nk + kb]) continue;
    const uint8_t* block = P.packed + ((b * P.Hkv + hkv) * P.nk + kb) * P.block_bytes;
    // the float32 roundings of the definition: (q_scale k_scale) scale, then P c, then - anchor
    const float c = (qs * ks[kb]) * P.scale;
    float margin = NEG_INF;
    if (P.full[qb * P.nk + kb]) {
      int64_t i = 0;
      for (; i + 4 <= bs; i += 4) full_block<4>(P, rows.data() + i, block, row_best.data() + i);
      for (; i < bs; ++i) full_block<1>(P, rows.data() + i, block, row_best.data() + i);
      for (i = 0; i < bs; ++i) {
        if (qp[i] < 0) continue;
        const float best = static_cast<float>(row_best[i] - offset[i]);
        margin = std::max(margin, margin_of(best, c, anchor[i]));
      }
    } else {
      const int64_t* kp = kp_row + kb * bs;
      for (int64_t i = 0; i < bs; ++i) {
        if (qp[i] < 0) continue;
        row_products(P, rows[i], block, prod.data());
        bool seen = false;
        int32_t top = std::numeric_limits<int32_t>::min();
        for (int64_t j = 0; j < bs; ++j) {
          if (kp[j] < 0 || kp[j] > qp[i]) continue;
          seen = true;
          top = std::max(top, prod[j]);
        }
        if (seen) margin = std::max(margin, margin_of(static_cast<float>(top - offset[i]), c, anchor[i]));
      }
    }
    out[kb] = margin;
  }
}
#endif

bool vnni() { return LA_VNNI; }

at::Tensor int_margins(const at::Tensor& q8, const at::Tensor& k8, const at::Tensor& q_scale,
                       const at::Tensor& k_scale, const at::Tensor& anchor,
                       const at::Tensor& q_pos, const at::Tensor& kv_pos,
                       const at::Tensor& causal, const at::Tensor& full, int64_t block,
                       double scale) {
#if !LA_VNNI
  TORCH_CHECK(false, "int_margins: this build has no AVX-512 VNNI");
  return at::Tensor();
#else
  TORCH_CHECK(q8.scalar_type() == at::kChar && k8.scalar_type() == at::kChar,
              "int_margins: q8 and k8 must be int8");
  TORCH_CHECK(q8.dim() == 4 && k8.dim() == 4 && q8.is_contiguous() && k8.is_contiguous(),
              "int_margins: q8, k8 must be contiguous 4-D");
  TORCH_CHECK(q8.size(3) == k8.size(3) && q8.size(3) % 4 == 0 && q8.size(3) <= 1024,
              "int_margins: head dims must match, be a multiple of 4 and at most 1024");
  TORCH_CHECK(block > 0 && q8.size(2) % block == 0 && k8.size(2) % block == 0,
              "int_margins: lengths must be whole blocks");
  TORCH_CHECK(q8.size(0) == k8.size(0) && q8.size(1) % k8.size(1) == 0,
              "int_margins: batch or heads differ");
  const int64_t B = q8.size(0), H = q8.size(1), Hkv = k8.size(1), d4 = q8.size(3);
  const int64_t nq = q8.size(2) / block, nk = k8.size(2) / block;
  for (const auto* t : {&q_scale, &k_scale, &anchor})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(),
                "int_margins: scales and anchor must be contiguous float32");
  TORCH_CHECK(q_scale.numel() == B * H * nq && k_scale.numel() == B * Hkv * nk &&
                  anchor.numel() == B * H * nq * block,
              "int_margins: scale or anchor shape");
  TORCH_CHECK(q_pos.scalar_type() == at::kLong && kv_pos.scalar_type() == at::kLong &&
                  q_pos.is_contiguous() && kv_pos.is_contiguous() &&
                  q_pos.size(-1) == nq * block && kv_pos.size(-1) == nk * block &&
                  (q_pos.size(0) == 1 || q_pos.size(0) == B) &&
                  (kv_pos.size(0) == 1 || kv_pos.size(0) == B),
              "int_margins: positions must be int64 [Bp, nq * bs] and [Bp, nk * bs]");
  TORCH_CHECK(causal.scalar_type() == at::kBool && full.scalar_type() == at::kBool &&
                  causal.is_contiguous() && full.is_contiguous() && causal.numel() == nq * nk &&
                  full.numel() == nq * nk,
              "int_margins: causal and full must be bool [nq, nk]");
  Problem P{};
  P.B = B;
  P.H = H;
  P.Hkv = Hkv;
  P.nq = nq;
  P.nk = nk;
  P.bs = block;
  P.d4 = d4;
  P.quads = d4 / 4;
  P.nvec = (block + LANES - 1) / LANES;
  P.block_bytes = P.quads * P.nvec * 64;
  std::vector<uint8_t> packed(static_cast<size_t>(B * Hkv * nk * P.block_bytes));
  const int8_t* k = k8.data_ptr<int8_t>();
  at::parallel_for(0, B * Hkv * nk, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      pack_block(k + i * block * d4, block, d4, P.nvec, packed.data() + i * P.block_bytes);
  });
  auto out = at::empty({B, H, nq, nk}, q_scale.options());
  P.q8 = q8.data_ptr<int8_t>();
  P.q_scale = q_scale.data_ptr<float>();
  P.k_scale = k_scale.data_ptr<float>();
  P.anchor = anchor.data_ptr<float>();
  P.q_pos = q_pos.data_ptr<int64_t>();
  P.kv_pos = kv_pos.data_ptr<int64_t>();
  P.qpsB = q_pos.size(0) == 1 ? 0 : nq * block;
  P.kpsB = kv_pos.size(0) == 1 ? 0 : nk * block;
  P.causal = causal.data_ptr<bool>();
  P.full = full.data_ptr<bool>();
  P.scale = static_cast<float>(scale);
  P.packed = packed.data();
  P.out = out.data_ptr<float>();
  const int64_t heads = B * H;
  at::parallel_for(0, nq * heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<int32_t> prod(P.nvec * LANES), row_best(block);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / heads, bh = item % heads;
      const int64_t qb = n % 2 == 0 ? n / 2 : nq - 1 - n / 2;  // 0, nq-1, 1, nq-2, ...
      run_item(P, bh / H, bh % H, qb, prod, row_best);
    }
  });
  return out;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("vnni", &vnni, "whether this build has the AVX-512 VNNI byte dot product");
  m.def("int_margins", &int_margins, "SALE's block margins from int8 products");
}
