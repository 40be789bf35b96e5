// Few-query (decode) attention over a KV cache layer, dense or over selected pages / tokens, and the
// scorer of query-aware selection (row_mass, at the end).
//
// Layout: q [B, H, Tq, D]; keys / values [B, Hkv, T, D] (any strides, last axis contiguous); positions
// int64 with -1 for an empty slot. A "stream" is one (batch row, index head): for dense attention and
// for a selection per KV head, the index head is the KV head and its rows are the G * Tq (query head,
// query) pairs of the group, so each K/V row is read once per step for all of them; for a selection
// per query head, each query head is its own stream (rows = its Tq queries).
//
// Each stream's key slots are split into chunks; (stream, chunk) work items run in parallel and keep a
// partial online softmax (max, sum, acc) in the log2 domain; a second pass merges a stream's chunks by
// log-sum-exp. Inside an item, keys are processed in tiles of TILE slots: scores for all rows (one
// K row load serves every row), masking by position, a rescaled online-softmax update, then P @ V.
// fp32 accumulation for fp32 and bf16 inputs.
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "simd.h"

namespace {

constexpr int TILE = 32;  // key slots per tile
constexpr int64_t AHEAD_ENTRIES = 2;  // selected pages prefetched this many entries ahead
constexpr int64_t FAR_BYTES = 32 << 10;  // dense: K and V rows prefetched this far ahead
constexpr int MAX_D = 256;

inline float to_float(float x) { return x; }
inline float to_float(bf16 x) { return static_cast<float>(x); }

// ---------------------------------------------------------------------------------------------
// The problem, with every stride in elements.
template <typename T>
struct Problem {
  int64_t B, H, Hkv, Tq, D, Dp, nc;  // values: Dp = D rounded up to W, nc = Dp / W
  int64_t Dk, Dkp, nck;               // queries and keys (Dk < D: a channel-pruned cache layer)
  int64_t Hi, Gs, R;                  // streams per batch row, query heads per stream, rows per stream
  const T* q;
  int64_t qsB, qsH, qsT;
  const T* k;
  const T* v;
  int64_t ksB, ksH, ksT, vsB, vsH, vsT;
  const int64_t* qpos;  // [Bp, Tq]
  int64_t qpsB, qpsT;
  const int64_t* kpos;  // [Bp, T] or [B, Hkv, T] (dense); [B, cap] or [B, Hkv, cap] (selected)
  int64_t kpsB, kpsH, kpsT;  // kpsH = 0: every KV head of a row holds the same positions
  const int64_t* index;  // [B, Hi, n] or nullptr (dense over T slots)
  int64_t isB, isH, isN;
  int64_t n;     // entries per stream: T (dense) or index entries
  int64_t unit;  // slots per entry (1 for dense)
  float scale2;  // scale * log2(e)
  bool causal;
  Mask mask[MAX_D / W];   // lanes of each W-chunk of D that exist
  Mask kmask[MAX_D / W];  // the same for Dk
};

struct Scratch {
  std::vector<float> q, s;  // q: [R, Dkp] scaled rows; s: [R, TILE] scores then probabilities
  std::vector<bf16> qb;     // [R, Dkp] the unscaled rows of a bf16 query (for qk_rows_dot)
  std::vector<int64_t> qp;  // [R] query position per row (-1: padding row)
};

// Chunk c of a row whose lanes ``mask`` gives per chunk (P.mask: a value row, P.kmask: a key row).
// NC > 0: the head dim is NC * W, known at compile time (full unrolling, unmasked loads); NC == 0:
// any head dim.
template <int NC, typename T>
inline V load_chunk(const T* p, int64_t c, const Mask* mask) {
  if constexpr (NC > 0) {
    return vload(p + c * W);
  } else {
    return vload(p + c * W, mask[c]);
  }
}

// Rows fetched a key at a time while a tile's scores are computed, spread over the tile (a burst
// of a whole tile of prefetches would overflow the fill buffers). Key j of the tile fetches
// kp[j] + k_off and vp[j] + v_off, into L2. Dense: the rows FAR_BYTES ahead in the same stream (the
// hardware prefetchers alone let the loop fall behind the stream; fetching into L1 that far ahead
// evicts the rows in use). Selected rows: the next tile's rows (scattered, so the hardware cannot
// predict them).
template <typename T>
struct Ahead {
  const T* const* kp;
  const T* const* vp;
  int n;  // keys of the tile that have a row to fetch
  int lines;
  int64_t k_off, v_off;
  LA_INLINE void fetch(int j) const {
    if (j >= n) return;
    const char* k = reinterpret_cast<const char*>(kp[j] + k_off);
    const char* v = reinterpret_cast<const char*>(vp[j] + v_off);
    for (int i = 0; i < lines; ++i) {
      prefetch_l2(k + 64 * i);
      prefetch_l2(v + 64 * i);
    }
  }
};

// scores s[i][j] = q_i . k_j for NR rows starting at q; two keys at a time so that 2 * NR
// independent FMA chains hide the FMA latency.
template <int NC, int NR, typename T>
inline void qk_rows(const Problem<T>& P, const float* q, const T* const* kp, int nj, float* s,
                    const Ahead<T>* ahead) {
  const int64_t nc = NC > 0 ? NC : P.nck, Dp = P.Dkp;
  int j = 0;
  for (; j + 2 <= nj; j += 2) {
    if (ahead) {
      ahead->fetch(j);
      ahead->fetch(j + 1);
    }
    V a0[NR], a1[NR];
    for (int i = 0; i < NR; ++i) a0[i] = a1[i] = vzero();
    const T* k0 = kp[j];
    const T* k1 = kp[j + 1];
#pragma GCC unroll 16
    for (int64_t c = 0; c < nc; ++c) {
      const V x0 = load_chunk<NC>(k0, c, P.kmask), x1 = load_chunk<NC>(k1, c, P.kmask);
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) {
        const V qi = vload(q + i * Dp + c * W);
        a0[i] = vfma(qi, x0, a0[i]);
        a1[i] = vfma(qi, x1, a1[i]);
      }
    }
    for (int i = 0; i < NR; ++i) {
      s[i * TILE + j] = vsum(a0[i]);
      s[i * TILE + j + 1] = vsum(a1[i]);
    }
  }
  if (j < nj) {
    if (ahead) {
      for (int jj = j; jj < TILE; ++jj) ahead->fetch(jj);
    }
    V a0[NR];
    for (int i = 0; i < NR; ++i) a0[i] = vzero();
#pragma GCC unroll 16
    for (int64_t c = 0; c < nc; ++c) {
      const V x0 = load_chunk<NC>(kp[j], c, P.kmask);
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) a0[i] = vfma(vload(q + i * Dp + c * W), x0, a0[i]);
    }
    for (int i = 0; i < NR; ++i) s[i * TILE + j] = vsum(a0[i]);
  }
}

// bf16 keys with the bf16 dot-product instruction, for D a multiple of 32: the unscaled bf16 rows
// (exact products, fp32 sums; about half the instructions of converting K to fp32 for FMAs, which
// made bf16 decode compute-bound), the sums scaled afterwards.
template <typename T, int NC>
constexpr bool kDotBf16 = LA_DPBF16 && std::is_same_v<T, bf16> && NC > 0 && NC % 2 == 0;

#if LA_DPBF16
template <int NC, int NR>
inline void qk_rows_dot(const Problem<bf16>& P, const bf16* q, const bf16* const* kp, int nj,
                        float* s, const Ahead<bf16>* ahead) {
  const int64_t Dp = P.Dkp;
  auto ld = [](const bf16* x) { return (__m512bh)_mm512_loadu_si512(x); };
  int j = 0;
  for (; j + 2 <= nj; j += 2) {
    if (ahead) {
      ahead->fetch(j);
      ahead->fetch(j + 1);
    }
    __m512 a0[NR], a1[NR];
    for (int i = 0; i < NR; ++i) a0[i] = a1[i] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int c = 0; c < NC / 2; ++c) {
      const __m512bh x0 = ld(kp[j] + c * 32), x1 = ld(kp[j + 1] + c * 32);
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) {
        const __m512bh qi = ld(q + i * Dp + c * 32);
        a0[i] = _mm512_dpbf16_ps(a0[i], qi, x0);
        a1[i] = _mm512_dpbf16_ps(a1[i], qi, x1);
      }
    }
    for (int i = 0; i < NR; ++i) {
      s[i * TILE + j] = _mm512_reduce_add_ps(a0[i]) * P.scale2;
      s[i * TILE + j + 1] = _mm512_reduce_add_ps(a1[i]) * P.scale2;
    }
  }
  if (j < nj) {
    if (ahead) {
      for (int jj = j; jj < TILE; ++jj) ahead->fetch(jj);
    }
    __m512 a0[NR];
    for (int i = 0; i < NR; ++i) a0[i] = _mm512_setzero_ps();
#pragma GCC unroll 8
    for (int c = 0; c < NC / 2; ++c) {
      const __m512bh x0 = ld(kp[j] + c * 32);
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) a0[i] = _mm512_dpbf16_ps(a0[i], ld(q + i * Dp + c * 32), x0);
    }
    for (int i = 0; i < NR; ++i) s[i * TILE + j] = _mm512_reduce_add_ps(a0[i]) * P.scale2;
  }
}
#endif

// Scores of the NR rows from row r: by qk_rows_dot where it applies, else by qk_rows.
template <int NC, int NR, typename T>
inline void qk_block(const Problem<T>& P, const Scratch& S, int64_t r, const T* const* kp, int nj,
                     float* s, const Ahead<T>* ahead) {
#if LA_DPBF16
  if constexpr (kDotBf16<T, NC>) {
    qk_rows_dot<NC, NR>(P, S.qb.data() + r * P.Dkp, kp, nj, s + r * TILE, ahead);
    return;
  }
#endif
  qk_rows<NC, NR>(P, S.q.data() + r * P.Dkp, kp, nj, s + r * TILE, ahead);
}

// acc[i] += sum_j p[i][j] v_j for NR rows; two W-chunks of D at a time (2 * NR FMA chains), the
// accumulators stay in registers over the tile.
template <int NC, int NR, typename T>
inline void pv_rows(const Problem<T>& P, const float* p, const T* const* vp, int nj, float* acc) {
  const int64_t nc = NC > 0 ? NC : P.nc, Dp = P.Dp;
  int64_t c = 0;
  for (; c + 2 <= nc; c += 2) {
    V a0[NR], a1[NR];
    for (int i = 0; i < NR; ++i) {
      a0[i] = vload(acc + i * Dp + c * W);
      a1[i] = vload(acc + i * Dp + (c + 1) * W);
    }
    for (int j = 0; j < nj; ++j) {
      const V x0 = load_chunk<NC>(vp[j], c, P.mask), x1 = load_chunk<NC>(vp[j], c + 1, P.mask);
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) {
        const V pi = vset(p[i * TILE + j]);
        a0[i] = vfma(pi, x0, a0[i]);
        a1[i] = vfma(pi, x1, a1[i]);
      }
    }
    for (int i = 0; i < NR; ++i) {
      vstore(acc + i * Dp + c * W, a0[i]);
      vstore(acc + i * Dp + (c + 1) * W, a1[i]);
    }
  }
  if (c < nc) {
    V a0[NR];
    for (int i = 0; i < NR; ++i) a0[i] = vload(acc + i * Dp + c * W);
    for (int j = 0; j < nj; ++j) {
      const V x0 = load_chunk<NC>(vp[j], c, P.mask);
      for (int i = 0; i < NR; ++i) a0[i] = vfma(vset(p[i * TILE + j]), x0, a0[i]);
    }
    for (int i = 0; i < NR; ++i) vstore(acc + i * Dp + c * W, a0[i]);
  }
}

// The same for a compile-time D: each V row is read whole, in order (sequential for the hardware
// prefetchers), into NR * NC accumulators that stay in registers over the tile.
template <int NC, int NR, typename T>
inline void pv_rows_seq(const Problem<T>& P, const float* p, const T* const* vp, int nj,
                        float* acc) {
  static_assert(NC > 0, "compile-time D only");
  const int64_t Dp = P.Dp;
  V a[NR][NC];
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) a[i][c] = vload(acc + i * Dp + c * W);
  for (int j = 0; j < nj; ++j) {
    V pi[NR];
#pragma GCC unroll 4
    for (int i = 0; i < NR; ++i) pi[i] = vset(p[i * TILE + j]);
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) {
      const V x = vload(vp[j] + c * W);
#pragma GCC unroll 4
      for (int i = 0; i < NR; ++i) a[i][c] = vfma(pi[i], x, a[i][c]);
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NR; ++i)
#pragma GCC unroll 16
    for (int c = 0; c < NC; ++c) vstore(acc + i * Dp + c * W, a[i][c]);
}

// P @ V for all R rows: row blocks sized so that the accumulators fit the 32 vector registers.
template <int NC, typename T>
inline void pv_all(const Problem<T>& P, const float* s, const T* const* vp, int nj, float* acc) {
  const int64_t R = P.R;
  int64_t r = 0;
  if constexpr (NC > 0 && NC <= 4) {
    for (; r + 4 <= R; r += 4) pv_rows_seq<NC, 4>(P, s + r * TILE, vp, nj, acc + r * P.Dp);
  }
  if constexpr (NC > 0 && NC <= 8) {
    for (; r + 2 <= R; r += 2) pv_rows_seq<NC, 2>(P, s + r * TILE, vp, nj, acc + r * P.Dp);
    for (; r < R; ++r) pv_rows_seq<NC, 1>(P, s + r * TILE, vp, nj, acc + r * P.Dp);
  }
  for (; r + 4 <= R; r += 4) pv_rows<NC, 4>(P, s + r * TILE, vp, nj, acc + r * P.Dp);
  for (; r < R; ++r) pv_rows<NC, 1>(P, s + r * TILE, vp, nj, acc + r * P.Dp);
}

template <typename T, typename F4, typename F3, typename F2, typename F1>
inline void by_row_blocks(int64_t R, F4 f4, F3 f3, F2 f2, F1 f1) {
  int64_t r = 0;
  for (; r + 4 <= R; r += 4) f4(r);
  switch (R - r) {
    case 3: f3(r); break;
    case 2: f2(r); break;
    case 1: f1(r); break;
    default: break;
  }
}

// One tile of nj key slots: update the online softmax state (m, l in the log2 domain, acc).
template <int NC, typename T>
void tile(const Problem<T>& P, Scratch& S, const Ahead<T>* ahead, const T* const* kp,
          const T* const* vp,
          const int64_t* pos, int nj, bool need_mask, float* m, float* l, float* acc) {
  const int64_t R = P.R;
  float* s = S.s.data();
  by_row_blocks<T>(
      R, [&](int64_t r) { qk_block<NC, 4>(P, S, r, kp, nj, s, r ? nullptr : ahead); },
      [&](int64_t r) { qk_block<NC, 3>(P, S, r, kp, nj, s, r ? nullptr : ahead); },
      [&](int64_t r) { qk_block<NC, 2>(P, S, r, kp, nj, s, r ? nullptr : ahead); },
      [&](int64_t r) { qk_block<NC, 1>(P, S, r, kp, nj, s, r ? nullptr : ahead); });
  for (int64_t r = 0; r < R; ++r) {
    float* sr = s + r * TILE;
    for (int j = nj; j < TILE; ++j) sr[j] = NEG_INF;
    if (need_mask) {
      const int64_t qp = S.qp[r];
      for (int j = 0; j < nj; ++j)
        if (qp < 0 || (P.causal && pos[j] > qp)) sr[j] = NEG_INF;
    }
    V s0 = vload(sr), s1 = vload(sr + W);
    const float m_new = std::max(m[r], vhmax(vmax(s0, s1)));
    if (m_new == NEG_INF) {  // nothing visible to this row yet
      for (int j = 0; j < TILE; ++j) sr[j] = 0.f;
      continue;
    }
    V mn = vset(-m_new);
    V p0 = vexp2(vadd(s0, mn)), p1 = vexp2(vadd(s1, mn));
    vstore(sr, p0);
    vstore(sr + W, p1);
    const float alpha = m[r] == NEG_INF ? 0.f : std::exp2(m[r] - m_new);
    l[r] = l[r] * alpha + vsum(vadd(p0, p1));
    if (alpha != 1.f) {
      float* ar = acc + r * P.Dp;
      V va = vset(alpha);
      for (int64_t c = 0; c < P.nc; ++c) vstore(ar + c * W, vmul(vload(ar + c * W), va));
    }
    m[r] = m_new;
  }
  pv_all<NC>(P, s, vp, nj, acc);
}

// Stream (b, ih), entries [e0, e1): the partial state [m R | l R | acc R * Dp] into part.
template <int NC, typename T>
void run_item(const Problem<T>& P, Scratch& S, int64_t b, int64_t ih, int64_t e0, int64_t e1,
              float* part) {
  const int64_t R = P.R, G = P.H / P.Hkv;
  const int64_t h0 = ih * P.Gs;  // first query head of the stream
  const int64_t kv = h0 / G;
  float* m = part;
  float* l = part + R;
  float* acc = part + 2 * R;
  std::fill(m, m + R, NEG_INF);
  std::fill(l, l + R, 0.f);
  std::fill(acc, acc + R * P.Dp, 0.f);
  const int64_t qb = P.qpsB ? b : 0;
  int64_t min_qp = std::numeric_limits<int64_t>::max();
  for (int64_t g = 0; g < P.Gs; ++g) {
    for (int64_t t = 0; t < P.Tq; ++t) {
      const int64_t r = g * P.Tq + t;
      const T* src = P.q + b * P.qsB + (h0 + g) * P.qsH + t * P.qsT;
      float* dst = S.q.data() + r * P.Dkp;
      for (int64_t d = 0; d < P.Dk; ++d) dst[d] = to_float(src[d]) * P.scale2;
      for (int64_t d = P.Dk; d < P.Dkp; ++d) dst[d] = 0.f;
      if constexpr (kDotBf16<T, NC>) std::copy(src, src + P.Dk, S.qb.data() + r * P.Dkp);
      S.qp[r] = P.qpos[qb * P.qpsB + t * P.qpsT];
      min_qp = std::min(min_qp, S.qp[r]);
    }
  }
  const T* kbase = P.k + b * P.ksB + kv * P.ksH;
  const T* vbase = P.v + b * P.vsB + kv * P.vsH;
  const int64_t* pbase = P.kpos + b * P.kpsB + kv * P.kpsH;
  const int64_t* ibase = P.index ? P.index + b * P.isB + ih * P.isH : nullptr;
  const int64_t row_bytes = std::max(P.D, P.Dk) * static_cast<int64_t>(sizeof(T));
  const int lines = static_cast<int>((row_bytes + 63) / 64);
  const int64_t far = std::max<int64_t>(1, FAR_BYTES / row_bytes);
  // Tiles are filled one ahead of use; while a tile's scores are computed, rows further on are
  // prefetched key by key (see Ahead), so that memory loads overlap the arithmetic.
  struct List {
    const T* kp[TILE];
    const T* vp[TILE];
    int64_t pos[TILE];
    int64_t slot[TILE];
    int nj;
    int64_t max_pos;
  };
  int64_t e = e0, u = 0;
  auto fill = [&](List& t) {
    t.nj = 0;
    t.max_pos = -1;
    while (t.nj < TILE && e < e1) {
      int64_t slot;
      if (ibase == nullptr) {
        slot = e++;
      } else {
        const int64_t idx = ibase[e * P.isN];
        if (idx < 0) {
          ++e;
          continue;
        }
        slot = idx * P.unit + u;
        if (u == 0 && P.unit > 1 && e + AHEAD_ENTRIES < e1) {
          // a page's rows are contiguous: bring the whole page a few entries ahead into L2 (the
          // hardware prefetchers restart at every page of the selection)
          const int64_t ahead_idx = ibase[(e + AHEAD_ENTRIES) * P.isN];
          if (ahead_idx >= 0) {
            const char* ka = reinterpret_cast<const char*>(kbase + ahead_idx * P.unit * P.ksT);
            const char* va = reinterpret_cast<const char*>(vbase + ahead_idx * P.unit * P.vsT);
            for (int64_t i = 0; i < P.unit * lines; ++i) {
              prefetch_l2(ka + 64 * i);
              prefetch_l2(va + 64 * i);
            }
          }
        }
        if (++u == P.unit) {
          u = 0;
          ++e;
        }
      }
      const int64_t p = pbase[slot * P.kpsT];
      if (p < 0) continue;  // empty slot: invisible to every row
      const T* kr = kbase + slot * P.ksT;
      const T* vr = vbase + slot * P.vsT;
      t.kp[t.nj] = kr;
      t.vp[t.nj] = vr;
      t.pos[t.nj] = p;
      t.slot[t.nj] = slot;
      t.max_pos = std::max(t.max_pos, p);
      ++t.nj;
    }
  };
  List lists[2];
  int cur = 0;
  fill(lists[cur]);
  while (lists[cur].nj) {
    fill(lists[1 - cur]);
    const List& t = lists[cur];
    const bool need_mask = min_qp < 0 || (P.causal && t.max_pos > min_qp);
    Ahead<T> ahead;
    if (ibase == nullptr) {  // slots in order: fetch slot + far while it is in the item
      int n_far = 0;
      while (n_far < t.nj && t.slot[n_far] + far < e1) ++n_far;
      ahead = {t.kp, t.vp, n_far, lines, far * P.ksT, far * P.vsT};
    } else {
      const List& n = lists[1 - cur];
      ahead = {n.kp, n.vp, n.nj, lines, 0, 0};
    }
    tile<NC>(P, S, &ahead, t.kp, t.vp, t.pos, t.nj, need_mask, m, l,
             acc);
    cur = 1 - cur;
  }
}

// Merge a stream's chunk partials by log-sum-exp and write out [B, H, Tq, D], lse [B, H, Tq].
template <typename T>
void merge(const Problem<T>& P, int64_t b, int64_t ih, int64_t chunks, const float* parts,
           int64_t part_size, T* out, float* lse, std::vector<float>& acc) {
  const int64_t R = P.R;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t g = r / P.Tq, t = r % P.Tq, h = ih * P.Gs + g;
    T* o = out + ((b * P.H + h) * P.Tq + t) * P.D;
    float M = NEG_INF;
    for (int64_t c = 0; c < chunks; ++c) M = std::max(M, parts[c * part_size + r]);
    float* lse_r = lse + (b * P.H + h) * P.Tq + t;
    if (M == NEG_INF) {
      for (int64_t d = 0; d < P.D; ++d) o[d] = T(0.f);
      *lse_r = NEG_INF;
      continue;
    }
    float L = 0.f;
    std::fill(acc.begin(), acc.begin() + P.D, 0.f);
    for (int64_t c = 0; c < chunks; ++c) {
      const float* pc = parts + c * part_size;
      if (pc[r] == NEG_INF) continue;
      const float w = std::exp2(pc[r] - M);
      L += pc[R + r] * w;
      const float* a = pc + 2 * R + r * P.Dp;
      for (int64_t d = 0; d < P.D; ++d) acc[d] += a[d] * w;
    }
    const float inv = 1.f / L;
    for (int64_t d = 0; d < P.D; ++d) o[d] = T(acc[d] * inv);
    *lse_r = (M + std::log2(L)) * LN2;
  }
}

// mask[c]: the lanes of W-chunk c of a row of dim elements that exist, for its nc chunks.
inline void lane_masks(Mask* mask, int64_t nc, int64_t dim) {
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t lanes = std::min<int64_t>(W, dim - c * W);
    mask[c] = static_cast<Mask>(lanes == W ? 0xFFFF : (1u << lanes) - 1);
  }
}

template <typename T>
void run(Problem<T>& P, T* out, float* lse) {
  lane_masks(P.mask, P.nc, P.D);
  lane_masks(P.kmask, P.nck, P.Dk);
  const int64_t streams = P.B * P.Hi;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Enough items to balance the threads, none smaller than ~256 key slots.
  const int64_t min_entries = std::max<int64_t>(1, 256 / P.unit);
  int64_t chunks = std::max<int64_t>(1, (8 * threads + streams - 1) / streams);
  chunks = std::min<int64_t>(chunks, std::max<int64_t>(1, P.n / min_entries));
  while (chunks > 1 && (streams * chunks) % threads) --chunks;
  const int64_t per_chunk = (P.n + chunks - 1) / chunks;
  const int64_t part_size = 2 * P.R + P.R * P.Dp;
  // compile-time head dims for the common shapes; keys narrower than values (a channel-pruned
  // layer) take the run-time path
  auto run_one = P.Dk != P.D    ? &run_item<0, T>
                 : P.D == 128 ? &run_item<8, T>
                 : P.D == 64  ? &run_item<4, T>
                              : &run_item<0, T>;
  std::vector<float> parts(static_cast<size_t>(streams * chunks * part_size));
  at::parallel_for(0, streams * chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch S;
    S.q.resize(P.R * P.Dkp);
    S.qb.resize(P.R * P.Dkp);
    S.s.resize(P.R * TILE);
    S.qp.resize(P.R);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t stream = item / chunks, c = item % chunks;
      const int64_t e0 = std::min(P.n, c * per_chunk), e1 = std::min(P.n, e0 + per_chunk);
      run_one(P, S, stream / P.Hi, stream % P.Hi, e0, e1, parts.data() + item * part_size);
    }
  });
  at::parallel_for(0, streams, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(P.Dp);
    for (int64_t stream = begin; stream < end; ++stream) {
      merge(P, stream / P.Hi, stream % P.Hi, chunks, parts.data() + stream * chunks * part_size,
            part_size, out, lse, acc);
    }
  });
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& q_pos) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "decode kernel: CPU tensors only");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "decode kernel: q, k, v must be 4-D");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "decode kernel: q, k, v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16,
              "decode kernel: float32 or bfloat16 only, got ", q.scalar_type());
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode kernel: the head axis must be contiguous");
  TORCH_CHECK(k.size(0) == v.size(0) && k.size(1) == v.size(1) && k.size(2) == v.size(2),
              "decode kernel: k and v differ in shape (up to the head dim)");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "decode kernel: q and k differ");
  TORCH_CHECK(k.size(3) <= v.size(3), "decode kernel: keys wider than values");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "decode kernel: H must be a multiple of Hkv");
  TORCH_CHECK(v.size(3) <= MAX_D, "decode kernel: head dim up to ", MAX_D);
  TORCH_CHECK(q_pos.scalar_type() == at::kLong && q_pos.dim() == 2 && q_pos.size(1) == q.size(2),
              "decode kernel: q_pos must be int64 [Bp, Tq]");
  TORCH_CHECK(q_pos.size(0) == 1 || q_pos.size(0) == q.size(0), "decode kernel: q_pos batch");
}

template <typename T>
Problem<T> make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const at::Tensor& q_pos, const at::Tensor& kv_pos, double scale,
                        bool causal) {
  Problem<T> P{};
  P.B = q.size(0);
  P.H = q.size(1);
  P.Tq = q.size(2);
  P.D = v.size(3);
  P.Dk = k.size(3);
  P.Dkp = (P.Dk + W - 1) / W * W;
  P.nck = P.Dkp / W;
  P.Hkv = k.size(1);
  P.Dp = (P.D + W - 1) / W * W;
  P.nc = P.Dp / W;
  P.q = q.data_ptr<T>();
  P.qsB = q.stride(0);
  P.qsH = q.stride(1);
  P.qsT = q.stride(2);
  P.k = k.data_ptr<T>();
  P.v = v.data_ptr<T>();
  P.ksB = k.stride(0);
  P.ksH = k.stride(1);
  P.ksT = k.stride(2);
  P.vsB = v.stride(0);
  P.vsH = v.stride(1);
  P.vsT = v.stride(2);
  P.qpos = q_pos.data_ptr<int64_t>();
  P.qpsB = q_pos.size(0) == 1 ? 0 : q_pos.stride(0);
  P.qpsT = q_pos.stride(1);
  P.kpos = kv_pos.data_ptr<int64_t>();
  P.kpsB = kv_pos.size(0) == 1 ? 0 : kv_pos.stride(0);
  P.kpsH = kv_pos.dim() == 3 ? kv_pos.stride(1) : 0;
  P.kpsT = kv_pos.stride(kv_pos.dim() - 1);
  P.scale2 = static_cast<float>(scale) * LOG2E;
  P.causal = causal;
  P.unit = 1;
  return P;
}

template <typename F>
void dispatch(const at::Tensor& q, F fn) {
  if (q.scalar_type() == at::kFloat)
    fn(float(0));
  else
    fn(bf16(0.f));
}

// out [B, H, Tq, Dv] (Dv: the values' head dim) and lse [B, H, Tq], filled by fn.
std::vector<at::Tensor> finish(const at::Tensor& q, int64_t dv,
                               const std::function<void(void*, float*)>& fn) {
  auto out = at::empty({q.size(0), q.size(1), q.size(2), dv}, q.options());
  auto lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  fn(out.data_ptr(), lse.data_ptr<float>());
  return {out, lse};
}

// Dense: q [B, H, Tq, D] over k, v [B, Hkv, T, D]; q_pos [Bp, Tq], kv_pos [Bp, T] or
// [B, Hkv, T] int64 (per-head retention: each KV head its own positions).
std::vector<at::Tensor> decode_dense(const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& q_pos,
                                     const at::Tensor& kv_pos, double scale, bool causal) {
  check_inputs(q, k, v, q_pos);
  const bool per_head = kv_pos.dim() == 3;
  TORCH_CHECK(kv_pos.scalar_type() == at::kLong && (kv_pos.dim() == 2 || per_head) &&
                  kv_pos.size(-1) == k.size(2) &&
                  (kv_pos.size(0) == 1 || kv_pos.size(0) == q.size(0)) &&
                  (!per_head || (kv_pos.size(0) == q.size(0) && kv_pos.size(1) == k.size(1))),
              "decode kernel: kv_pos must be int64 [Bp, T] or [B, Hkv, T]");
  return finish(q, v.size(3), [&](void* out, float* lse) {
    dispatch(q, [&](auto zero) {
      using scalar_t = decltype(zero);
      auto P = make_problem<scalar_t>(q, k, v, q_pos, kv_pos, scale, causal);
      P.Hi = P.Hkv;
      P.Gs = P.H / P.Hkv;
      P.R = P.Gs * P.Tq;
      P.n = k.size(2);
      run(P, static_cast<scalar_t*>(out), lse);
    });
  });
}

// Selected: q over the entries of index [B, Hi, n] (Hi = Hkv: shared by a KV head's group; Hi = H:
// one selection per query head) into the layer's full storage keys, values [B, Hkv, cap, D] and
// positions [B, cap] or [B, Hkv, cap]; entry e names slots [e * unit, (e + 1) * unit); -1 = unused.
std::vector<at::Tensor> decode_selected(const at::Tensor& q, const at::Tensor& keys,
                                        const at::Tensor& values, const at::Tensor& positions,
                                        const at::Tensor& index, int64_t unit,
                                        const at::Tensor& q_pos, double scale, bool causal) {
  check_inputs(q, keys, values, q_pos);
  TORCH_CHECK(unit >= 1 && keys.size(2) % unit == 0, "decode kernel: unit must divide capacity");
  TORCH_CHECK(positions.scalar_type() == at::kLong &&
                  (positions.dim() == 2 ||
                   (positions.dim() == 3 && positions.size(1) == keys.size(1))) &&
                  positions.size(0) == q.size(0) && positions.size(-1) == keys.size(2),
              "decode kernel: positions must be int64 [B, cap] or [B, Hkv, cap]");
  TORCH_CHECK(index.scalar_type() == at::kLong && index.dim() == 3 && index.size(0) == q.size(0),
              "decode kernel: index must be int64 [B, Hi, n]");
  const int64_t Hi = index.size(1);
  TORCH_CHECK(Hi == keys.size(1) || Hi == q.size(1),
              "decode kernel: index heads must be Hkv or H, got ", Hi);
  if (index.numel()) {
    const int64_t hi = index.max().item<int64_t>(), lo = index.min().item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < keys.size(2) / unit, "decode kernel: index out of range [",
                lo, ", ", hi, "] for ", keys.size(2) / unit, " entries");
  }
  return finish(q, values.size(3), [&](void* out, float* lse) {
    dispatch(q, [&](auto zero) {
      using scalar_t = decltype(zero);
      auto P = make_problem<scalar_t>(q, keys, values, q_pos, positions, scale, causal);
      P.kpsB = positions.stride(0);
      P.Hi = Hi;
      P.Gs = P.H / Hi;
      P.R = P.Gs * P.Tq;
      P.index = index.data_ptr<int64_t>();
      P.isB = index.stride(0);
      P.isH = index.stride(1);
      P.isN = index.stride(2);
      P.n = index.size(2);
      P.unit = unit;
      run(P, static_cast<scalar_t*>(out), lse);
    });
  });
}

// Row mass, the score of query-aware selection over pages (Quest: rows [q- | q+] against the page
// key bounds [min | max]) or tokens (Loki, Double Sparsity: low-dimensional queries against the
// cache's low-dimensional keys). For each (batch row b, KV head h) and entry n with present[b, n]:
//   mass[b, h, n] = sum_r softmax_n(scale * rows[b, h, r] . table[b, h, n])
// absent entries get -inf; a row with no present entry adds nothing.
// Pass 1 streams the table once for all R rows of a head (work items: head x block of entries): the
// scaled scores (log2 domain) of a block, exponentiated against the block's maximum while in cache,
// into a [B * Hkv, R, N] buffer, with each (block, row)'s max and sum; pass 2 weights each block's
// rows by their share of the row's softmax normaliser and sums the rows.
// With a bfloat16 table whose width is a multiple of 32 and AVX512-BF16, pass 1 uses the bf16
// dot-product instruction, which rounds the rows to bfloat16 (fp32 accumulation); otherwise it
// converts the table to fp32 and uses fp32 FMAs.
struct MassProblem {
  int64_t BH, Hh, N, E, R, nc;  // nc: W-chunks of E
  int64_t tsB, tsH, tsN;        // table strides
  const bool* present;
  int64_t psB, psN;
  const float* rows;  // [BH, R, nc * W] scaled rows (zero padded)
  float* s;           // [BH, R, N]
  Mask mask[2 * MAX_D / W];
};

// Scaled scores of entries [n0, n1) of head bh for all rows, converting the table to fp32.
template <typename T>
void scores_fp32(const MassProblem& M, const T* tab, int64_t bh, int64_t n0, int64_t n1) {
  const int64_t b = bh / M.Hh, Ep = M.nc * W;
  const float* rq = M.rows + bh * M.R * Ep;
  float* s = M.s + bh * M.R * M.N;
  for (int64_t n = n0; n < n1; ++n) {
    if (!M.present[b * M.psB + n * M.psN]) {
      for (int64_t r = 0; r < M.R; ++r) s[r * M.N + n] = NEG_INF;
      continue;
    }
    const T* t = tab + n * M.tsN;
    int64_t r = 0;
    for (; r + 4 <= M.R; r += 4) {
      V a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
      for (int64_t c = 0; c < M.nc; ++c) {
        const V tc = vload(t + c * W, M.mask[c]);
        a0 = vfma(vload(rq + (r + 0) * Ep + c * W), tc, a0);
        a1 = vfma(vload(rq + (r + 1) * Ep + c * W), tc, a1);
        a2 = vfma(vload(rq + (r + 2) * Ep + c * W), tc, a2);
        a3 = vfma(vload(rq + (r + 3) * Ep + c * W), tc, a3);
      }
      float out4[4];
      vsum4(a0, a1, a2, a3, out4);
      for (int i = 0; i < 4; ++i) s[(r + i) * M.N + n] = out4[i];
    }
    for (; r < M.R; ++r) {
      V a0 = vzero();
      for (int64_t c = 0; c < M.nc; ++c)
        a0 = vfma(vload(rq + r * Ep + c * W), vload(t + c * W, M.mask[c]), a0);
      s[r * M.N + n] = vsum(a0);
    }
  }
}

#if LA_AVX512
// In-register transpose of a 16 x 16 float block: r[i] lane j  ->  r[j] lane i.
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xDD);
  }
}

// Pass 1 for a narrow table (E a multiple of 16; used for E = 16, e.g. Loki's 16 low-dimensional
// key features) with `present` contiguous: 16 entries at a time, transposed in registers so that each
// row's 16 scores come out of plain FMAs with broadcast query features (no horizontal sums).
// Returns the first entry it did not process.
template <typename T>
int64_t scores_narrow(const MassProblem& M, const T* tab, int64_t bh, int64_t n0, int64_t n1) {
  const int64_t b = bh / M.Hh, Ep = M.nc * W;
  const float* rq = M.rows + bh * M.R * Ep;
  float* s = M.s + bh * M.R * M.N;
  const bool* pres = M.present + b * M.psB;
  int64_t n = n0;
  for (; n + 16 <= n1; n += 16) {
    for (int64_t c = 0; c < M.nc; ++c) {
      __m512 col[16];
      for (int i = 0; i < 16; ++i) col[i] = vload(tab + (n + i) * M.tsN + c * W).x;
      transpose16(col);  // col[e]: feature c * 16 + e of the 16 entries
      for (int64_t r = 0; r < M.R; ++r) {
        const float* q = rq + r * Ep + c * W;
        __m512 acc = c ? _mm512_loadu_ps(s + r * M.N + n) : _mm512_setzero_ps();
        for (int e = 0; e < 16; ++e) acc = _mm512_fmadd_ps(_mm512_set1_ps(q[e]), col[e], acc);
        _mm512_storeu_ps(s + r * M.N + n, acc);
      }
    }
    const __mmask16 absent = _mm_cmpeq_epi8_mask(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(pres + n)), _mm_setzero_si128());
    if (absent)
      for (int64_t r = 0; r < M.R; ++r)
        _mm512_mask_storeu_ps(s + r * M.N + n, absent, _mm512_set1_ps(NEG_INF));
  }
  return n;
}
#endif

#if LA_DPBF16
// The same for a bf16 table whose width E is a multiple of 32, by the bf16 dot-product instruction;
// rbf: the rows rounded to bf16 [BH, R, E].
void scores_dpbf16(const MassProblem& M, const bf16* tab, const bf16* rbf, int64_t bh, int64_t n0,
                   int64_t n1) {
  const int64_t b = bh / M.Hh, n32 = M.E / 32;
  const bf16* rq = rbf + bh * M.R * M.E;
  float* s = M.s + bh * M.R * M.N;
  auto ld = [](const bf16* x) { return (__m512bh)_mm512_loadu_si512(x); };
  for (int64_t n = n0; n < n1; ++n) {
    if (!M.present[b * M.psB + n * M.psN]) {
      for (int64_t r = 0; r < M.R; ++r) s[r * M.N + n] = NEG_INF;
      continue;
    }
    const bf16* t = tab + n * M.tsN;
    if (n + 4 < n1) prefetch(t + 4 * M.tsN);
    int64_t r = 0;
    for (; r + 4 <= M.R; r += 4) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t c = 0; c < n32; ++c) {
        const __m512bh tc = ld(t + c * 32);
        a0 = _mm512_dpbf16_ps(a0, ld(rq + (r + 0) * M.E + c * 32), tc);
        a1 = _mm512_dpbf16_ps(a1, ld(rq + (r + 1) * M.E + c * 32), tc);
        a2 = _mm512_dpbf16_ps(a2, ld(rq + (r + 2) * M.E + c * 32), tc);
        a3 = _mm512_dpbf16_ps(a3, ld(rq + (r + 3) * M.E + c * 32), tc);
      }
      float out4[4];
      vsum4({a0}, {a1}, {a2}, {a3}, out4);
      for (int i = 0; i < 4; ++i) s[(r + i) * M.N + n] = out4[i];
    }
    for (; r < M.R; ++r) {
      __m512 a0 = _mm512_setzero_ps();
      for (int64_t c = 0; c < n32; ++c)
        a0 = _mm512_dpbf16_ps(a0, ld(rq + r * M.E + c * 32), ld(t + c * 32));
      s[r * M.N + n] = _mm512_reduce_add_ps(a0);
    }
  }
}
#endif

// After pass 1 on entries [n0, n1) of head bh, while they are in cache: per row, exponentiate the
// scores against the block's own maximum in place and record (max, sum) in stats[r].
void block_exp(const MassProblem& M, int64_t bh, int64_t n0, int64_t n1, float* stats) {
  for (int64_t r = 0; r < M.R; ++r) {
    float* sr = M.s + (bh * M.R + r) * M.N;
    V mx = vset(NEG_INF);
    int64_t n = n0;
    for (; n + W <= n1; n += W) mx = vmax(mx, vload(sr + n));
    float m = vhmax(mx);
    for (; n < n1; ++n) m = std::max(m, sr[n]);
    float l = 0.f;
    if (m == NEG_INF) {  // no present entry in this block
      std::fill(sr + n0, sr + n1, 0.f);
    } else {
      const V mn = vset(-m);
      V sum = vzero();
      for (n = n0; n + W <= n1; n += W) {
        const V e = vexp2(vadd(vload(sr + n), mn));
        vstore(sr + n, e);
        sum = vadd(sum, e);
      }
      l = vsum(sum);
      for (; n < n1; ++n) {
        sr[n] = sr[n] == NEG_INF ? 0.f : std::exp2(sr[n] - m);
        l += sr[n];
      }
    }
    stats[2 * r] = m;
    stats[2 * r + 1] = l;
  }
}

// Pass 2 on entries [n0, n1) of head bh: out = sum_r coef[r] * e_r (coef[r]: the block's share of
// row r's softmax normaliser, 0 for a row that sees nothing); absent entries -inf.
void block_sum(const MassProblem& M, int64_t bh, int64_t n0, int64_t n1, const float* coef,
               float* out) {
  float* o = out + bh * M.N;
  const float* s = M.s + bh * M.R * M.N;
  const int64_t b = bh / M.Hh;
  int64_t n = n0;
  for (; n + W <= n1; n += W) {
    V acc = vzero();
    for (int64_t r = 0; r < M.R; ++r) acc = vfma(vset(coef[r]), vload(s + r * M.N + n), acc);
    vstore(o + n, acc);
  }
  for (; n < n1; ++n) {
    float acc = 0.f;
    for (int64_t r = 0; r < M.R; ++r) acc += coef[r] * s[r * M.N + n];
    o[n] = acc;
  }
  for (n = n0; n < n1; ++n)
    if (!M.present[b * M.psB + n * M.psN]) o[n] = NEG_INF;
}

// rows float32 [B, Hkv, R, E]; table [B, Hkv, N, E] float32 or bfloat16 (last axis contiguous);
// present bool [B, N]. Returns mass float32 [B, Hkv, N].
at::Tensor row_mass(const at::Tensor& rows, const at::Tensor& table, const at::Tensor& present,
                    double scale) {
  TORCH_CHECK(rows.device().is_cpu() && table.device().is_cpu() && present.device().is_cpu(),
              "row_mass: CPU tensors only");
  TORCH_CHECK(rows.dim() == 4 && table.dim() == 4, "row_mass: rows and table must be 4-D");
  TORCH_CHECK(rows.scalar_type() == at::kFloat && rows.is_contiguous(),
              "row_mass: rows must be contiguous float32");
  TORCH_CHECK(table.scalar_type() == at::kFloat || table.scalar_type() == at::kBFloat16,
              "row_mass: table must be float32 or bfloat16");
  TORCH_CHECK(table.stride(3) == 1, "row_mass: table rows must be contiguous");
  TORCH_CHECK(rows.size(0) == table.size(0) && rows.size(1) == table.size(1) &&
                  rows.size(3) == table.size(3),
              "row_mass: rows [B, H, R, E] and table [B, H, N, E] differ");
  TORCH_CHECK(table.size(3) <= 2 * MAX_D, "row_mass: rows up to ", 2 * MAX_D, " wide");
  TORCH_CHECK(rows.size(2) >= 1, "row_mass: at least one row");
  TORCH_CHECK(present.scalar_type() == at::kBool && present.dim() == 2 &&
                  present.size(0) == table.size(0) && present.size(1) == table.size(2),
              "row_mass: present must be bool [B, N]");
  MassProblem M{};
  const int64_t B = table.size(0);
  M.Hh = table.size(1);
  M.BH = B * M.Hh;
  M.N = table.size(2);
  M.E = table.size(3);
  M.R = rows.size(2);
  M.nc = (M.E + W - 1) / W;
  M.tsB = table.stride(0);
  M.tsH = table.stride(1);
  M.tsN = table.stride(2);
  M.present = present.data_ptr<bool>();
  M.psB = present.stride(0);
  M.psN = present.stride(1);
  lane_masks(M.mask, M.nc, M.E);
  const int64_t Ep = M.nc * W;
  // the rows times scale * log2(e), zero padded to whole vectors
  std::vector<float> rbuf(M.BH * M.R * Ep, 0.f);
  const float* src = rows.data_ptr<float>();
  const float sc = static_cast<float>(scale) * LOG2E;
  for (int64_t i = 0; i < M.BH * M.R; ++i)
    for (int64_t e = 0; e < M.E; ++e) rbuf[i * Ep + e] = src[i * M.E + e] * sc;
  M.rows = rbuf.data();
  auto s = at::empty({M.BH, M.R, M.N}, rows.options());
  M.s = s.data_ptr<float>();
  const bool bf = table.scalar_type() == at::kBFloat16;
  // one-vector tables (16 features): transposed 16-entry blocks (measured 1.7x faster for bf16
  // at 128K tokens x 8 heads, equal for fp32, slower for wider tables); wide bf16 tables: bf16
  // dot products
  const bool narrow = LA_AVX512 && M.E == W && M.psN == 1;
  const bool fast = !narrow && LA_DPBF16 && bf && M.E % 32 == 0;
  std::vector<bf16> rbf;
  if (fast) {
    rbf.resize(M.BH * M.R * M.E);
    for (int64_t i = 0; i < M.BH * M.R; ++i)
      for (int64_t e = 0; e < M.E; ++e) rbf[i * M.E + e] = bf16(rbuf[i * Ep + e]);
  }
  constexpr int64_t BLOCK = 512;  // entries per work item
  const int64_t blocks = (M.N + BLOCK - 1) / BLOCK;
  std::vector<float> stats(M.BH * blocks * M.R * 2);  // per (head, block, row): max, sum
  at::parallel_for(0, M.BH * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / blocks, n0 = (item % blocks) * BLOCK;
      const int64_t n1 = std::min(M.N, n0 + BLOCK);
      const int64_t off = (bh / M.Hh) * M.tsB + (bh % M.Hh) * M.tsH;
      const bf16* tbf = bf ? reinterpret_cast<const bf16*>(table.data_ptr()) + off : nullptr;
      const float* tf = bf ? nullptr : table.data_ptr<float>() + off;
      int64_t n = n0;
#if LA_AVX512
      if (narrow) n = bf ? scores_narrow(M, tbf, bh, n0, n1) : scores_narrow(M, tf, bh, n0, n1);
#endif
      if (fast) {
#if LA_DPBF16
        scores_dpbf16(M, tbf, rbf.data(), bh, n, n1);
#endif
      } else if (bf) {
        scores_fp32(M, tbf, bh, n, n1);
      } else {
        scores_fp32(M, tf, bh, n, n1);
      }
      block_exp(M, bh, n0, n1, stats.data() + item * M.R * 2);
    }
  });
  // each row's global max and normaliser; then each block's coefficient per row
  std::vector<float> coef(M.BH * blocks * M.R, 0.f);
  for (int64_t bh = 0; bh < M.BH; ++bh) {
    for (int64_t r = 0; r < M.R; ++r) {
      auto st = [&](int64_t blk) { return stats.data() + ((bh * blocks + blk) * M.R + r) * 2; };
      float top = NEG_INF, total = 0.f;
      for (int64_t blk = 0; blk < blocks; ++blk) top = std::max(top, st(blk)[0]);
      if (top == NEG_INF) continue;  // this row sees no entry: it adds nothing
      for (int64_t blk = 0; blk < blocks; ++blk)
        if (st(blk)[0] != NEG_INF) total += st(blk)[1] * std::exp2(st(blk)[0] - top);
      for (int64_t blk = 0; blk < blocks; ++blk)
        if (st(blk)[0] != NEG_INF)
          coef[(bh * blocks + blk) * M.R + r] = std::exp2(st(blk)[0] - top) / total;
    }
  }
  auto out = at::empty({B, M.Hh, M.N}, rows.options());
  at::parallel_for(0, M.BH * blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / blocks, n0 = (item % blocks) * BLOCK;
      block_sum(M, bh, n0, std::min(M.N, n0 + BLOCK), coef.data() + item * M.R,
                out.data_ptr<float>());
    }
  });
  return out;
}

// Top-k entries of each row of scores [M, N] float32 (contiguous): the indices of the k largest, in
// ascending index order, picks whose score is -inf replaced by -1 and moved to the end. Equal scores
// at the threshold go to the lowest indices. Per row: a threshold from an evenly strided sample
// that about 2k entries pass, one pass collecting those candidates in index order, the k-th
// largest among them by nth_element, and one pass over the candidates writing the picks; when
// fewer than k entries pass, the same on the whole row.
inline uint32_t order_key(float x) {  // monotone map of float32 to uint32 (NaN above +inf)
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct Candidates {
  std::vector<uint32_t> key, sorted;
  std::vector<int64_t> index;
};

// The k largest of the candidates (key, index; index ascending) into o, as described above.
void pick_top(Candidates& C, int64_t k, int64_t* o) {
  const int64_t n = static_cast<int64_t>(C.key.size());
  C.sorted.assign(C.key.begin(), C.key.end());
  std::nth_element(C.sorted.begin(), C.sorted.begin() + (k - 1), C.sorted.end(),
                   std::greater<uint32_t>());
  const uint32_t tau = C.sorted[k - 1], neg_inf = order_key(NEG_INF);
  int64_t above = 0;
  for (int64_t i = 0; i < n; ++i) above += C.key[i] > tau;
  int64_t ties = k - above, j = 0, dropped = 0;
  for (int64_t i = 0; i < n && j + dropped < k; ++i) {
    const uint32_t u = C.key[i];
    if (u > tau || (u == tau && ties-- > 0)) {
      if (u == neg_inf)
        ++dropped;
      else
        o[j++] = C.index[i];
    }
  }
  for (; j < k; ++j) o[j] = -1;
}

void top_row(const float* x, int64_t N, int64_t k, int64_t* o, Candidates& C) {
  constexpr int64_t SAMPLE = 2048;
  uint32_t floor_key = 0;  // entries with a smaller order key cannot be picked
  if (N >= 8 * SAMPLE && 16 * k <= N) {
    C.sorted.resize(SAMPLE);
    const int64_t stride = N / SAMPLE;
    for (int64_t i = 0; i < SAMPLE; ++i) C.sorted[i] = order_key(x[i * stride]);
    const int64_t j = std::min<int64_t>(SAMPLE - 1, (2 * k * SAMPLE + N - 1) / N + 8);
    std::nth_element(C.sorted.begin(), C.sorted.begin() + j, C.sorted.end(),
                     std::greater<uint32_t>());
    floor_key = C.sorted[j];
  }
  for (int attempt = 0; attempt < 2; ++attempt) {
    C.key.clear();
    C.index.clear();
    for (int64_t n = 0; n < N; ++n) {
      const uint32_t u = order_key(x[n]);
      if (u >= floor_key) {
        C.key.push_back(u);
        C.index.push_back(n);
      }
    }
    if (static_cast<int64_t>(C.key.size()) >= k) break;
    floor_key = 0;  // the sample's threshold let too few through: take the whole row
  }
  pick_top(C, k, o);
}

at::Tensor top_index(const at::Tensor& scores, int64_t k) {
  TORCH_CHECK(scores.device().is_cpu() && scores.scalar_type() == at::kFloat &&
                  scores.is_contiguous() && scores.dim() >= 1,
              "top_index: contiguous float32 CPU scores");
  const int64_t N = scores.size(-1);
  TORCH_CHECK(k >= 1 && k <= N, "top_index: k must be in [1, ", N, "], got ", k);
  const int64_t M = N ? scores.numel() / N : 0;
  auto sizes = scores.sizes().vec();
  sizes.back() = k;
  auto out = at::empty(sizes, scores.options().dtype(at::kLong));
  const float* src = scores.data_ptr<float>();
  int64_t* dst = out.data_ptr<int64_t>();
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    Candidates C;
    for (int64_t row = begin; row < end; ++row) top_row(src + row * N, N, k, dst + row * k, C);
  });
  return out;
}

}  // namespace

namespace {

template <typename T>
bool all_finite(const at::Tensor& t) {
  // t [1, heads, 1, D] with any strides
  const T* p = t.data_ptr<T>();
  for (int64_t h = 0; h < t.size(1); ++h)
    for (int64_t d = 0; d < t.size(3); ++d)
      if (!std::isfinite(to_float(p[h * t.stride(1) + d * t.stride(3)]))) return false;
  return true;
}

// storage [1, Hkv, cap, D'] at slot[h] of each KV head = src [1, Hkv, 1, D] (any strides) at
// channels [Hkv, D'] (a channel-pruned layer's kept key channels; nullptr: D' = D, every channel).
template <typename T>
void write_slots(const at::Tensor& storage, const at::Tensor& src, const int64_t* slot,
                 const int64_t* channels) {
  T* s = storage.data_ptr<T>();
  const T* in = src.data_ptr<T>();
  const int64_t dim = storage.size(3);
  for (int64_t h = 0; h < storage.size(1); ++h) {
    T* row = s + h * storage.stride(1) + slot[h] * storage.stride(2);
    for (int64_t d = 0; d < dim; ++d) {
      const int64_t c = channels ? channels[h * dim + d] : d;
      row[d * storage.stride(3)] = in[h * src.stride(1) + c * src.stride(3)];
    }
  }
}

// q [1, H, 1, D] at each query head's KV head's channels [Hkv, D'] -> [1, H, 1, D'].
template <typename T>
at::Tensor gather_query(const at::Tensor& q, const int64_t* channels, int64_t n_kv, int64_t kept) {
  auto out = at::empty({1, q.size(1), 1, kept}, q.options());
  const T* in = q.data_ptr<T>();
  T* o = out.data_ptr<T>();
  const int64_t group = q.size(1) / n_kv;
  for (int64_t h = 0; h < q.size(1); ++h)
    for (int64_t d = 0; d < kept; ++d)
      o[h * kept + d] = in[h * q.stride(1) + channels[(h / group) * kept + d] * q.stride(3)];
  return out;
}

}  // namespace

// One decode step of a cache layer of one row in one call: k_new, v_new [1, Hkv, 1, D | Dv]
// (channels [1, Hkv, Dk] int64 defined: a channel-pruned layer, whose keys and queries are
// reduced to those channels; undefined: Dk = D) written at each KV head's next slot (row_len [1, Hkv] int64, CPU; an empty slot, position -1)
// of the layer's storage keys, values [1, Hkv, cap, Dk | Dv] and positions pos [1, Hkv, cap], at
// position next_pos [1]; then q [1, H, 1, Dk] attends causally over slots
// [0, max(row_len) + 1) (decode_dense, each KV head by its own positions); window > 0: only the
// positions below sinks and the last window ones are seen (StreamingLLM's mask), and the third
// result counts, per KV head at most, the real keys that no later query sees (its retention).
// Everything is checked before anything is written. Returns ({}, 0, 0), nothing written, when q,
// k_new or v_new holds a non-finite value; else ({out, lse, row_len + 1, next_pos + 1}, the
// shortest row before, the dead keys).
std::tuple<std::vector<at::Tensor>, int64_t, int64_t> decode_step(
    const at::Tensor& q, const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& keys,
    const at::Tensor& values, const at::Tensor& pos, const at::Tensor& row_len,
    const at::Tensor& next_pos, double scale, const c10::optional<at::Tensor>& channels,
    int64_t sinks, int64_t window) {
  TORCH_CHECK(q.dim() == 4 && k_new.dim() == 4 && v_new.dim() == 4 && keys.dim() == 4 &&
                  values.dim() == 4 && pos.dim() == 3,
              "decode step: q, k_new, v_new, keys, values must be 4-D, pos 3-D");
  const int64_t n_kv = keys.size(1), cap = keys.size(2);
  TORCH_CHECK(q.size(0) == 1 && q.size(2) == 1 && k_new.size(0) == 1 && k_new.size(2) == 1 &&
                  v_new.size(0) == 1 && v_new.size(2) == 1 && keys.size(0) == 1,
              "decode step: one row, one query, one new token");
  TORCH_CHECK(k_new.size(1) == n_kv && v_new.size(1) == n_kv && values.size(1) == n_kv &&
                  v_new.size(3) == values.size(3) && q.size(3) == k_new.size(3) &&
                  values.size(2) == cap && pos.size(1) == n_kv && pos.size(2) == cap &&
                  q.size(1) % n_kv == 0,
              "decode step: the new token's shape differs from the layer's");
  const int64_t* kept = nullptr;
  if (channels.has_value() && channels->defined()) {
    const at::Tensor& c = *channels;
    TORCH_CHECK(c.scalar_type() == at::kLong && c.is_contiguous() && c.dim() == 3 &&
                    c.size(0) == 1 && c.size(1) == n_kv && c.size(2) == keys.size(3),
                "decode step: channels must be int64 [1, Hkv, Dk]");
    kept = c.data_ptr<int64_t>();
    for (int64_t i = 0; i < c.numel(); ++i)
      TORCH_CHECK(kept[i] >= 0 && kept[i] < k_new.size(3), "decode step: channel out of range");
  } else {
    TORCH_CHECK(k_new.size(3) == keys.size(3), "decode step: the new token's shape differs");
  }
  TORCH_CHECK(q.scalar_type() == keys.scalar_type() && k_new.scalar_type() == keys.scalar_type() &&
                  v_new.scalar_type() == keys.scalar_type() &&
                  values.scalar_type() == keys.scalar_type(),
              "decode step: every tensor must have the layer's dtype");
  TORCH_CHECK(pos.scalar_type() == at::kLong && row_len.scalar_type() == at::kLong &&
                  next_pos.scalar_type() == at::kLong && row_len.is_contiguous() &&
                  row_len.numel() == n_kv && next_pos.numel() == 1,
              "decode step: pos, row_len [1, Hkv] and next_pos [1] must be int64");
  const int64_t* slot = row_len.data_ptr<int64_t>();
  int64_t* p = pos.data_ptr<int64_t>();
  int64_t longest = 0, shortest = cap;
  for (int64_t h = 0; h < n_kv; ++h) {
    TORCH_CHECK(slot[h] >= 0 && slot[h] < cap, "decode step: no free slot in KV head ", h);
    TORCH_CHECK(p[h * pos.stride(1) + slot[h] * pos.stride(2)] == -1,
                "decode step: the next slot of KV head ", h, " is not empty");
    longest = std::max(longest, slot[h]);
    shortest = std::min(shortest, slot[h]);
  }
  bool finite = true;
  dispatch(q, [&](auto zero) {
    using T = decltype(zero);
    finite = all_finite<T>(q) && all_finite<T>(k_new) && all_finite<T>(v_new);
  });
  if (!finite) return std::make_tuple(std::vector<at::Tensor>{}, int64_t{0}, int64_t{0});
  const int64_t position = next_pos.data_ptr<int64_t>()[0];
  at::Tensor query = q;
  dispatch(q, [&](auto zero) {
    using T = decltype(zero);
    if (kept) query = gather_query<T>(q, kept, n_kv, keys.size(3));
    write_slots<T>(keys, k_new, slot, kept);
    write_slots<T>(values, v_new, slot, nullptr);
  });
  for (int64_t h = 0; h < n_kv; ++h) p[h * pos.stride(1) + slot[h] * pos.stride(2)] = position;
  const int64_t n = longest + 1;
  at::Tensor seen = pos.narrow(2, 0, n);
  int64_t dead = 0;
  if (window > 0) {  // sinks + window: the keys the mask hides marked empty, the dead ones counted
    seen = seen.clone();
    int64_t* sp = seen.data_ptr<int64_t>();
    for (int64_t h = 0; h < n_kv; ++h) {
      int64_t count = 0;
      for (int64_t t = 0; t < n; ++t) {
        int64_t& x = sp[h * seen.stride(1) + t * seen.stride(2)];
        if (x < sinks) continue;                         // a sink (or an empty slot)
        if (x <= position + 1 - window) ++count;         // no later query sees it
        if (position - x >= window) x = -1;              // this query does not either
      }
      dead = std::max(dead, count);
    }
  }
  auto att = decode_dense(query, keys.narrow(2, 0, n), values.narrow(2, 0, n), next_pos.view({1, 1}),
                          seen, scale, true);
  std::vector<at::Tensor> out{att[0], att[1], row_len + 1, next_pos + 1};
  return std::make_tuple(std::move(out), shortest, dead);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_dense", &decode_dense, "few-query attention over a whole cache layer");
  m.def("decode_step", &decode_step, "append one token to a cache layer and attend over it");
  m.def("decode_selected", &decode_selected, "few-query attention over selected pages / tokens");
  m.def("top_index", &top_index, "indices of the k largest scores per row, ascending");
  m.def("row_mass", &row_mass, "per entry: its softmax mass summed over query rows");
  m.attr("dpbf16") = static_cast<bool>(LA_DPBF16);
  m.attr("avx512") = static_cast<bool>(LA_AVX512);
  m.attr("avx2") = static_cast<bool>(LA_AVX2);
}
