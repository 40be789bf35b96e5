// Key maxima on CPU: for each row n of query columns (q_t[n] is [D, bs], a query per column) and
// each of its first count[n] key rows rows[n, w] (rows of k.reshape(-1, D)), the largest q . k over
// the row's queries; where some[n, w], only over the queries whose position q_pos[n, j] is >=
// max(rep_pos[n, w], 0) (-inf when there is none). Slots past count[n] get -inf.
//
// Parallel over rows (at::parallel_for). Per row, the products are a register-blocked loop over
// the head dimension (a block of keys x a block of query vectors, one broadcast key element per key
// and one load per query vector each step), as fast as oneDNN's brgemm on these small products (a
// few to a few hundred keys x bs queries x D) and fixed by construction: every score is one chain
// starting from 0 whatever the row, the block of keys or the number of keys, so the same key
// against the same queries gives bit-identical scores in every call. float32 keys (and bfloat16
// keys of an odd D, or on a CPU without the bf16 dot product) are read in place or widened into a
// thread-local buffer, and the chain is fused multiply-adds over d = 0 .. D-1; bfloat16 keys of an
// even D on a CPU with AVX512-BF16 (against queries that are bf16 values: key_maxima's float32
// query columns are checked) are read in place as pairs of channels, and the chain is bf16
// dot products over the pairs (vdpbf16ps: channel 2p + 1's product, then 2p's, each exact in
// float32, each sum rounded to nearest; bf16 subnormal inputs count as zero), twice the products
// a cycle of the float32 loop. Either way a score is D rounded sums of exact products. The maxima
// are taken from the scores of a block of keys while they are in cache.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

// A register block: KB keys x CB 16-lane vectors of queries (KB * CB accumulators), the most the
// vector registers hold with the query vectors and a broadcast key element (32 on AVX-512, 16 on
// AVX2 where a vector is two registers). Measured on AVX-512 (Zen 4, 1 thread, HiP's products at
// 16K): 4 x 4 ties oneDNN's brgemm and is ~15 % faster than 6 x 1.
#if LA_AVX512
constexpr int KB = 4, CB = 4;
#else
constexpr int KB = 6, CB = 1;
#endif

// s[j * ld + c] = k_j . q[:, c] for the NK keys kp[0 .. NK) and the NC * 16 columns from c0
template <int NK, int NC>
LA_INLINE void block_scores(const float* const* kp, const float* qt, int64_t dim, int64_t ld,
                            int64_t c0, float* s) {
  V acc[NK][NC];
  for (int j = 0; j < NK; ++j)
    for (int i = 0; i < NC; ++i) acc[j][i] = vzero();
  for (int64_t d = 0; d < dim; ++d) {
    V qv[NC];
    for (int i = 0; i < NC; ++i) qv[i] = vload(qt + d * ld + c0 + i * W);
    for (int j = 0; j < NK; ++j) {
      const V kv = vset(kp[j][d]);
      for (int i = 0; i < NC; ++i) acc[j][i] = vfma(kv, qv[i], acc[j][i]);
    }
  }
  for (int j = 0; j < NK; ++j)
    for (int i = 0; i < NC; ++i) vstore(s + j * ld + c0 + i * W, acc[j][i]);
}

// The scores of NK keys against every column (ld of them, a multiple of 16)
template <int NK>
void keys_scores(const float* const* kp, const float* qt, int64_t dim, int64_t ld, float* s) {
  int64_t c0 = 0;
  for (; c0 + CB * W <= ld; c0 += CB * W) block_scores<NK, CB>(kp, qt, dim, ld, c0, s);
  for (; c0 < ld; c0 += W) block_scores<NK, 1>(kp, qt, dim, ld, c0, s);
}

// The widest of s[0 .. bs) (x86 max: a NaN score is skipped)
inline float row_max(const float* s, int64_t bs) {
  V vm = vset(NEG_INF);
  int64_t c = 0;
  for (; c + W <= bs; c += W) vm = vmax(vm, vload(s + c));
  float mx = vhmax(vm);
  for (; c < bs; ++c) mx = std::max(mx, s[c]);
  return mx;
}

// The scores of nk <= KB keys against every column: one register block
inline void block_of_keys(int64_t nk, const float* const* kp, const float* qt, int64_t dim,
                          int64_t ld, float* s) {
  static_assert(KB <= 6, "keys_scores is instantiated for blocks of up to 6 keys");
  switch (nk) {
    case 6: keys_scores<std::min(KB, 6)>(kp, qt, dim, ld, s); break;
    case 5: keys_scores<std::min(KB, 5)>(kp, qt, dim, ld, s); break;
    case 4: keys_scores<std::min(KB, 4)>(kp, qt, dim, ld, s); break;
    case 3: keys_scores<3>(kp, qt, dim, ld, s); break;
    case 2: keys_scores<2>(kp, qt, dim, ld, s); break;
    default: keys_scores<1>(kp, qt, dim, ld, s); break;
  }
}

// A key row as float32: in place (float32), or widened into dst (bfloat16)
template <typename scalar_t>
inline const float* as_float(const scalar_t* src, float* dst, int64_t dim) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return src;
  } else {
    int64_t d = 0;
    for (; d + W <= dim; d += W) vstore(dst + d, vload(src + d));
    for (; d < dim; ++d) dst[d] = static_cast<float>(src[d]);
    return dst;
  }
}

#if LA_DPBF16
// s[j * ld + c] = k_j . q[:, c] by bf16 dot products (vdpbf16ps) for the NK bfloat16 key rows
// kp[j] (read as D / 2 pairs of channels) and the columns of qp [D / 2, ld] (each a pair of one
// column's bf16 channels 2p, 2p + 1) from c0: one chain per score over p = 0 .. D / 2 - 1 from 0,
// each step adding channel 2p + 1's product and then channel 2p's (products exact in float32,
// each sum rounded to nearest; bf16 subnormals count as zero), whatever the other keys
template <int NK, int NC>
LA_INLINE void pair_scores(const uint32_t* const* kp, const uint32_t* qp, int64_t d2, int64_t ld,
                           int64_t c0, float* s) {
  __m512 acc[NK][NC];
  for (int j = 0; j < NK; ++j)
    for (int i = 0; i < NC; ++i) acc[j][i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < d2; ++p) {
    __m512bh qv[NC];
    for (int i = 0; i < NC; ++i) qv[i] = (__m512bh)_mm512_loadu_si512(qp + p * ld + c0 + i * W);
    for (int j = 0; j < NK; ++j) {
      const __m512bh kv = (__m512bh)_mm512_set1_epi32(static_cast<int>(kp[j][p]));
      for (int i = 0; i < NC; ++i) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], qv[i], kv);
    }
  }
  for (int j = 0; j < NK; ++j)
    for (int i = 0; i < NC; ++i) _mm512_storeu_ps(s + j * ld + c0 + i * W, acc[j][i]);
}

template <int NK>
void pair_keys_scores(const uint32_t* const* kp, const uint32_t* qp, int64_t d2, int64_t ld,
                      float* s) {
  int64_t c0 = 0;
  for (; c0 + CB * W <= ld; c0 += CB * W) pair_scores<NK, CB>(kp, qp, d2, ld, c0, s);
  for (; c0 < ld; c0 += W) pair_scores<NK, 1>(kp, qp, d2, ld, c0, s);
}
#endif

// A row's queries as the products read them: float32 columns qt [D, ld]; for bfloat16 keys of an
// even D on a CPU with the bf16 dot product also bf16 pairs qp [D / 2, ld], and then every score
// of the row is a pair dot product (``pair_scores``)
struct RowQueries {
  const float* qt = nullptr;
  const uint32_t* qp = nullptr;
};

// The bf16 pairs of float32 columns qt [D, ld]; false (out unusable) when some value is not a
// bf16 value (a float32 query finer than bf16: the float32 products must read it as it is)
inline bool pack_pairs(const float* qt, int64_t dim, int64_t ld, std::vector<uint32_t>& out) {
  out.resize(dim / 2 * ld);
  uint32_t low = 0;  // the bits bf16 drops, of every value
  auto bits = [&low](float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof u);
    low |= u & 0xFFFFu;
    return u >> 16;
  };
  for (int64_t p = 0; p < dim / 2; ++p)
    for (int64_t c = 0; c < ld; ++c)
      out[p * ld + c] = bits(qt[2 * p * ld + c]) | (bits(qt[(2 * p + 1) * ld + c]) << 16);
  return low == 0;
}

template <typename scalar_t>
constexpr bool pairs_for() {
  return LA_DPBF16 && std::is_same_v<scalar_t, bf16>;
}

// Points the keys' pointers at what the products read: the bf16 rows (pairs), else float32 rows
// (widened into keys when bf16)
template <typename scalar_t>
inline void key_pointers(const scalar_t* const* rows, int64_t cnt, int64_t dim, bool pairs,
                         std::vector<float>& keys, std::vector<const void*>& ptrs) {
  ptrs.resize(cnt);
  keys.resize(pairs ? 0 : cnt * dim);
  for (int64_t w = 0; w < cnt; ++w)
    ptrs[w] = pairs ? static_cast<const void*>(rows[w])
                    : static_cast<const void*>(as_float(rows[w], keys.data() + w * dim, dim));
}

// s: the scores of the nk keys ptrs[0 .. nk) against the row's queries
inline void score_keys(int64_t nk, const void* const* ptrs, const RowQueries& rq, int64_t dim,
                       int64_t ld, float* s) {
#if LA_DPBF16
  if (rq.qp != nullptr) {
    const auto* kp = reinterpret_cast<const uint32_t* const*>(ptrs);
    switch (nk) {
      case 4: pair_keys_scores<std::min(KB, 4)>(kp, rq.qp, dim / 2, ld, s); return;
      case 3: pair_keys_scores<3>(kp, rq.qp, dim / 2, ld, s); return;
      case 2: pair_keys_scores<2>(kp, rq.qp, dim / 2, ld, s); return;
      default: pair_keys_scores<1>(kp, rq.qp, dim / 2, ld, s); return;
    }
  }
#endif
  block_of_keys(nk, reinterpret_cast<const float* const*>(ptrs), rq.qt, dim, ld, s);
}

// The widest of s[c] over the columns c < bs whose position is >= from (-inf when none)
inline float max_from(const float* s, const int64_t* pos, int64_t bs, int64_t from) {
  float mx = NEG_INF;
  for (int64_t c = 0; c < bs; ++c)
    if (pos[c] >= from) mx = std::max(mx, s[c]);
  return mx;
}

struct Problem {
  int64_t n_keys, n_kv, t_k, dim, bs, ld, width;
  int64_t sb, sh, st;  // k's element strides of batch row, head and position
  const float* q_t;    // [N, D, bs]
  const int64_t* q_pos;
  const int64_t* rows;
  const int64_t* count;
  const bool* some;
  const int64_t* rep_pos;
  float* out;
};

template <typename scalar_t>
inline const scalar_t* key_row(const Problem& p, const scalar_t* k, int64_t r) {
  const int64_t t = r % p.t_k, bh = r / p.t_k;
  return k + (bh / p.n_kv) * p.sb + (bh % p.n_kv) * p.sh + t * p.st;
}

// The thread-local buffers of one worker
struct Buffers {
  std::vector<float> keys, queries, scores;
  std::vector<uint32_t> pairs;
  std::vector<const void*> ptrs;
  std::vector<const void*> rows;
};

template <typename scalar_t>
void one_row(const Problem& p, const scalar_t* k, int64_t n, Buffers& buf) {
  float* out = p.out + n * p.width;
  const int64_t cnt = std::min(p.count[n], p.width);
  std::fill(out + std::max<int64_t>(cnt, 0), out + p.width, NEG_INF);
  if (cnt <= 0) return;
  const int64_t dim = p.dim, bs = p.bs, ld = p.ld;
  const int64_t* rows = p.rows + n * p.width;
  for (int64_t w = 0; w < cnt; ++w)
    TORCH_CHECK(rows[w] >= 0 && rows[w] < p.n_keys, "key row ", rows[w], " outside k");
  RowQueries rq{p.q_t + n * dim * bs};
  if (ld != bs) {  // columns padded with zeros to a whole number of vectors
    buf.queries.assign(dim * ld, 0.0f);
    for (int64_t d = 0; d < dim; ++d)
      std::copy(rq.qt + d * bs, rq.qt + (d + 1) * bs, buf.queries.data() + d * ld);
    rq.qt = buf.queries.data();
  }
  const bool pairs =
      pairs_for<scalar_t>() && dim % 2 == 0 && pack_pairs(rq.qt, dim, ld, buf.pairs);
  if (pairs) rq.qp = buf.pairs.data();
  buf.rows.resize(cnt);
  for (int64_t w = 0; w < cnt; ++w) buf.rows[w] = key_row(p, k, rows[w]);
  key_pointers(reinterpret_cast<const scalar_t* const*>(buf.rows.data()), cnt, dim, pairs,
               buf.keys, buf.ptrs);
  buf.scores.resize(KB * ld);
  float* s = buf.scores.data();
  const int64_t* pos = p.q_pos + n * bs;
  for (int64_t w0 = 0; w0 < cnt; w0 += KB) {
    const int64_t nk = std::min<int64_t>(KB, cnt - w0);
    score_keys(nk, buf.ptrs.data() + w0, rq, dim, ld, s);
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t w = w0 + j;
      const float* sj = s + j * ld;
      if (!p.some[n * p.width + w]) {
        out[w] = row_max(sj, bs);
        continue;
      }
      out[w] = max_from(sj, pos, bs, std::max<int64_t>(p.rep_pos[n * p.width + w], 0));
    }
  }
}

// HiP's hierarchical search for one row of queries (a batch row, head and query block), every
// round in this call: the same chunks, representatives, scores (bit for bit: the products above,
// times the scale, in float32) and choices as the PyTorch search over ``key_maxima``
// (``longattn.methods.hip``), whose definition this follows; the layout of its final blocks
// written to out_row [nk].
struct Search {
  int64_t n_kv, t_k, t_q, dim, bs, ld, heads, nq, nk, q_rows;
  int64_t sb, sh, st;      // k's element strides
  int64_t qb, qh, qt_;     // q's element strides
  float scale;
  const int64_t* q_pos;    // [Bq, nq, bs]
  const int64_t* kv_pos;   // [Bkv, Tk]
  int64_t kv_rows;         // Bkv: 1 (shared) or B
  const int64_t* n_cand;   // [nq]
  const int64_t* k_row;    // [nq]
  bool* out;               // [B, H, nq, nk]
};

struct Chunk {
  int64_t start, end;
  float score;
};

constexpr float UNSEEN = -std::numeric_limits<float>::max();

// Ranks before: the higher score (-0.0 as 0.0), then the earlier start
inline bool ranks_before(const Chunk& a, const Chunk& b) {
  return a.score > b.score || (a.score == b.score && a.start < b.start);
}

struct SearchBuffers {
  std::vector<float> queries, keys, scores;
  std::vector<uint32_t> pairs;
  std::vector<const void*> ptrs, rows;
  std::vector<Chunk> chunks, halves;
  std::vector<int64_t> from;  // per half: -2 nobody, -1 every query, else the first position
  std::vector<int64_t> fresh, reps;  // the halves scored this round and their representatives
};

template <typename scalar_t>
void search_row(const Search& p, const scalar_t* k, const scalar_t* q, int64_t n,
                SearchBuffers& buf) {
  const int64_t i = n % p.nq, h = (n / p.nq) % p.heads, b = n / (p.nq * p.heads);
  const int64_t dim = p.dim, bs = p.bs, ld = p.ld;
  const int64_t* pos = p.q_pos + ((p.q_rows == 1 ? 0 : b) * p.nq + i) * bs;
  const int64_t* kv_pos = p.kv_pos + (p.kv_rows == 1 ? 0 : b) * p.t_k;
  int64_t lowest = std::numeric_limits<int64_t>::max(), highest = -1;
  for (int64_t j = 0; j < bs; ++j) {
    lowest = pos[j] < 0 ? -1 : std::min(lowest, pos[j]);
    highest = std::max(highest, pos[j]);
  }
  if (lowest == std::numeric_limits<int64_t>::max()) lowest = -1;
  // the block's queries as columns (widened, or bf16 pairs: a row's channels 2p, 2p + 1 are its
  // p-th 32-bit word), zero past the queries and in the padding columns
  const bool pairs = pairs_for<scalar_t>() && dim % 2 == 0;
  RowQueries rq;
  if (pairs) {
    buf.pairs.assign(dim / 2 * ld, 0u);
    for (int64_t j = 0; j < bs && i * bs + j < p.t_q; ++j) {
      const auto* row = reinterpret_cast<const uint32_t*>(q + b * p.qb + h * p.qh +
                                                          (i * bs + j) * p.qt_);
      for (int64_t w = 0; w < dim / 2; ++w) buf.pairs[w * ld + j] = row[w];
    }
    rq.qp = buf.pairs.data();
  } else {
    buf.queries.assign(dim * ld, 0.0f);
    for (int64_t j = 0; j < bs && i * bs + j < p.t_q; ++j) {
      const scalar_t* row = q + b * p.qb + h * p.qh + (i * bs + j) * p.qt_;
      for (int64_t d = 0; d < dim; ++d) buf.queries[d * ld + j] = static_cast<float>(row[d]);
    }
    rq.qt = buf.queries.data();
  }
  const int64_t kv_head = h / (p.heads / p.n_kv);
  const scalar_t* keys = k + b * p.sb + kv_head * p.sh;
  const int64_t n_cand = p.n_cand[i], kept = p.k_row[i];
  auto& chunks = buf.chunks;
  chunks.clear();
  for (int64_t s = 0; s < kept; ++s) chunks.push_back({s * n_cand / kept, (s + 1) * n_cand / kept, 0.0f});
  for (bool first = true;; first = false) {
    bool split = false;
    for (const Chunk& c : chunks) split |= c.end - c.start > 1;
    if (!split) break;
    // this round's halves: a chunk of one block keeps its score (after the first round)
    auto& halves = buf.halves;
    halves.clear();
    buf.from.clear();
    buf.fresh.clear();
    buf.reps.clear();
    for (const Chunk& c : chunks) {
      const int64_t size = c.end - c.start;
      if (size == 1 && !first) {
        halves.push_back(c);
        buf.from.push_back(-3);  // scored in an earlier round
        continue;
      }
      const int64_t mid = c.start + ((size + 1) >> 1);
      for (const auto& [lo, hi] : {std::pair{c.start, mid}, std::pair{mid, c.end}}) {
        if (lo >= hi) continue;
        // the representative: the half's middle key
        const int64_t rep = std::clamp<int64_t>((lo * bs + std::min(hi * bs, p.t_k) - 1) >> 1,
                                                0, p.t_k - 1);
        const int64_t rp = kv_pos[rep];
        const bool nobody = rp < 0 || rp > highest;
        halves.push_back({lo, hi, UNSEEN});
        buf.from.push_back(nobody ? -2 : (rp > lowest ? std::max<int64_t>(rp, 0) : -1));
        if (!nobody) {
          buf.fresh.push_back(halves.size() - 1);
          buf.reps.push_back(rep);
        }
      }
    }
    // the fresh halves' representatives, scored in blocks of KB keys
    const auto& fresh = buf.fresh;
    const int64_t cnt = fresh.size();
    buf.rows.resize(cnt);
    for (int64_t f = 0; f < cnt; ++f) buf.rows[f] = keys + buf.reps[f] * p.st;
    key_pointers(reinterpret_cast<const scalar_t* const*>(buf.rows.data()), cnt, dim, pairs,
                 buf.keys, buf.ptrs);
    buf.scores.resize(KB * ld);
    float* s = buf.scores.data();
    for (int64_t f0 = 0; f0 < cnt; f0 += KB) {
      const int64_t nk = std::min<int64_t>(KB, cnt - f0);
      score_keys(nk, buf.ptrs.data() + f0, rq, dim, ld, s);
      for (int64_t j = 0; j < nk; ++j) {
        const int64_t w = fresh[f0 + j];
        const float* sj = s + j * ld;
        float mx = buf.from[w] == -1 ? row_max(sj, bs) : max_from(sj, pos, bs, buf.from[w]);
        mx = mx * p.scale;
        halves[w].score = mx == NEG_INF ? UNSEEN : mx;
      }
    }
    // the best ``kept`` halves
    const int64_t take = std::min<int64_t>(kept, halves.size());
    std::nth_element(halves.begin(), halves.begin() + take - 1, halves.end(), ranks_before);
    chunks.assign(halves.begin(), halves.begin() + take);
  }
  bool* out_row = p.out + n * p.nk;
  for (const Chunk& c : chunks)
    if (c.end - c.start == 1 && c.start < p.nk) out_row[c.start] = true;
}

void check(const at::Tensor& t, at::ScalarType type, int64_t dims, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == type, name, " has dtype ", t.scalar_type(), ", expected ", type);
  TORCH_CHECK(t.dim() == dims, name, " must have ", dims, " dimensions, got ", t.dim());
  TORCH_CHECK(dims == 4 || t.is_contiguous(), name, " must be contiguous");
}

// k [B, Hkv, Tk, D] float32 / bfloat16 (last axis contiguous); q_t [N, D, bs] float32; q_pos [N,
// bs], rows [N, W], count [N], rep_pos [N, W] int64; some [N, W] bool -> [N, W] float32
at::Tensor key_maxima(const at::Tensor& k, const at::Tensor& q_t, const at::Tensor& q_pos,
                      const at::Tensor& rows, const at::Tensor& count, const at::Tensor& some,
                      const at::Tensor& rep_pos) {
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16,
              "k must be float32 or bfloat16, got ", k.scalar_type());
  check(k, k.scalar_type(), 4, "k");
  TORCH_CHECK(k.stride(3) == 1, "k's last axis must be contiguous");
  check(q_t, at::kFloat, 3, "q_t");
  check(q_pos, at::kLong, 2, "q_pos");
  check(rows, at::kLong, 2, "rows");
  check(count, at::kLong, 1, "count");
  check(some, at::kBool, 2, "some");
  check(rep_pos, at::kLong, 2, "rep_pos");
  const int64_t n_rows = rows.size(0), width = rows.size(1), dim = k.size(3), bs = q_t.size(2);
  TORCH_CHECK(q_t.size(0) == n_rows && q_t.size(1) == dim, "q_t must be [N, D, bs]");
  TORCH_CHECK(q_pos.size(0) == n_rows && q_pos.size(1) == bs, "q_pos must be [N, bs]");
  TORCH_CHECK(count.size(0) == n_rows, "count must be [N]");
  TORCH_CHECK(some.sizes() == rows.sizes() && rep_pos.sizes() == rows.sizes(),
              "some and rep_pos must be shaped like rows");
  auto out = at::empty({n_rows, width}, q_t.options());
  Problem p{k.size(0) * k.size(1) * k.size(2),
            k.size(1),
            k.size(2),
            dim,
            bs,
            (bs + W - 1) / W * W,
            width,
            k.stride(0),
            k.stride(1),
            k.stride(2),
            q_t.data_ptr<float>(),
            q_pos.data_ptr<int64_t>(),
            rows.data_ptr<int64_t>(),
            count.data_ptr<int64_t>(),
            some.data_ptr<bool>(),
            rep_pos.data_ptr<int64_t>(),
            out.data_ptr<float>()};
  const bool is_float = k.scalar_type() == at::kFloat;
  const void* keys = k.data_ptr();
  at::parallel_for(0, n_rows, 8, [&](int64_t begin, int64_t end) {
    Buffers buf;
    for (int64_t n = begin; n < end; ++n) {
      if (is_float)
        one_row(p, static_cast<const float*>(keys), n, buf);
      else
        one_row(p, static_cast<const bf16*>(keys), n, buf);
    }
  });
  return out;
}

// k [B, Hkv, Tk, D], q [B, H, Tq, D] float32 / bfloat16 (one dtype, last axes contiguous); q_pos
// [Bq, nq, bs] (Bq 1 or B, -1 on padding), kv_pos [Bkv, Tk] (Bkv 1 or B), n_cand [nq], k_row [nq]
// int64 -> bool [B, H, nq, nk]: HiP's final key blocks per row
at::Tensor hierarchical_search(const at::Tensor& k, const at::Tensor& q, const at::Tensor& q_pos,
                               const at::Tensor& kv_pos, const at::Tensor& n_cand,
                               const at::Tensor& k_row, int64_t nk, double scale) {
  TORCH_CHECK(k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16,
              "k must be float32 or bfloat16, got ", k.scalar_type());
  check(k, k.scalar_type(), 4, "k");
  check(q, k.scalar_type(), 4, "q");
  TORCH_CHECK(k.stride(3) == 1 && q.stride(3) == 1, "k's and q's last axes must be contiguous");
  check(q_pos, at::kLong, 3, "q_pos");
  check(kv_pos, at::kLong, 2, "kv_pos");
  check(n_cand, at::kLong, 1, "n_cand");
  check(k_row, at::kLong, 1, "k_row");
  const int64_t batch = q.size(0), heads = q.size(1), nq = q_pos.size(1), bs = q_pos.size(2);
  TORCH_CHECK(k.size(0) == batch && heads % k.size(1) == 0 && k.size(3) == q.size(3),
              "k must be [B, Hkv, Tk, D] with H a multiple of Hkv");
  TORCH_CHECK(q_pos.size(0) == 1 || q_pos.size(0) == batch, "q_pos must have 1 or B rows");
  TORCH_CHECK(kv_pos.size(0) == 1 || kv_pos.size(0) == batch, "kv_pos must have 1 or B rows");
  TORCH_CHECK(kv_pos.size(1) == k.size(2), "kv_pos must have Tk columns");
  TORCH_CHECK(nq * bs >= q.size(2), "q_pos must cover q's positions");
  TORCH_CHECK(n_cand.size(0) == nq && k_row.size(0) == nq, "n_cand and k_row must be [nq]");
  const int64_t* cand = n_cand.data_ptr<int64_t>();
  const int64_t* kr = k_row.data_ptr<int64_t>();
  for (int64_t i = 0; i < nq; ++i)
    TORCH_CHECK(cand[i] >= 1 && cand[i] <= nk && kr[i] >= 1 && kr[i] <= cand[i],
                "query block ", i, ": n_cand ", cand[i], " and k_row ", kr[i], " out of range");
  TORCH_CHECK(nk * bs >= k.size(2) && k.size(2) > 0, "nk blocks must cover the keys");
  auto out = at::zeros({batch, heads, nq, nk}, q.options().dtype(at::kBool));
  Search p{k.size(1), k.size(2), q.size(2), k.size(3), bs, (bs + W - 1) / W * W, heads, nq, nk,
           q_pos.size(0), k.stride(0), k.stride(1), k.stride(2), q.stride(0), q.stride(1),
           q.stride(2), static_cast<float>(scale), q_pos.data_ptr<int64_t>(),
           kv_pos.data_ptr<int64_t>(), kv_pos.size(0), cand, kr, out.data_ptr<bool>()};
  const bool is_float = k.scalar_type() == at::kFloat;
  at::parallel_for(0, batch * heads * nq, 4, [&](int64_t begin, int64_t end) {
    SearchBuffers buf;
    for (int64_t n = begin; n < end; ++n) {
      if (is_float)
        search_row(p, k.data_ptr<float>(), q.data_ptr<float>(), n, buf);
      else
        search_row(p, static_cast<const bf16*>(k.data_ptr()),
                   static_cast<const bf16*>(q.data_ptr()), n, buf);
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("key_maxima", &key_maxima, "per row and key row: the best q . k over the row's queries");
  m.def("hierarchical_search", &hierarchical_search, "HiP's hierarchical top-k block search");
}
