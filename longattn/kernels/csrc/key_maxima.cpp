// Key maxima on CPU: for each row n of query columns (q_t[n] is [D, bs], a query per column) and
// each of its first count[n] key rows rows[n, w] (rows of k.reshape(-1, D)), the largest q . k over
// the row's queries; where some[n, w], only over the queries whose position q_pos[n, j] is >=
// max(rep_pos[n, w], 0) (-inf when there is none). Slots past count[n] get -inf.
//
// Parallel over rows (at::parallel_for). Per row, the keys are read in place (float32) or widened
// into a thread-local float32 buffer (bfloat16); the products are a register-blocked loop over the
// head dimension (a block of keys x a block of query vectors, one broadcast key element per key
// and one load per query vector each step), as fast as oneDNN's brgemm on these small products (a
// few to a few hundred keys x bs queries x D) and exact by construction: every score is one chain
// of fused multiply-adds over d = 0 .. D-1 starting from 0, whatever the row, the block of keys or
// the number of keys, so the same key against the same queries gives bit-identical scores in
// every call. The maxima are taken from the scores of a block of keys while they are in cache.

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
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
  std::vector<const float*> ptrs;
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
  buf.ptrs.resize(cnt);
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int64_t w = 0; w < cnt; ++w) buf.ptrs[w] = key_row(p, k, rows[w]);
  } else {  // bfloat16: widened once into the row's buffer
    buf.keys.resize(cnt * dim);
    for (int64_t w = 0; w < cnt; ++w) {
      const scalar_t* src = key_row(p, k, rows[w]);
      float* dst = buf.keys.data() + w * dim;
      int64_t d = 0;
      for (; d + W <= dim; d += W) vstore(dst + d, vload(src + d));
      for (; d < dim; ++d) dst[d] = static_cast<float>(src[d]);
      buf.ptrs[w] = dst;
    }
  }
  const float* qt = p.q_t + n * dim * bs;
  if (ld != bs) {  // columns padded with zeros to a whole number of vectors
    buf.queries.assign(dim * ld, 0.0f);
    for (int64_t d = 0; d < dim; ++d)
      std::copy(qt + d * bs, qt + (d + 1) * bs, buf.queries.data() + d * ld);
    qt = buf.queries.data();
  }
  buf.scores.resize(KB * ld);
  float* s = buf.scores.data();
  const int64_t* pos = p.q_pos + n * bs;
  for (int64_t w0 = 0; w0 < cnt; w0 += KB) {
    const int64_t nk = std::min<int64_t>(KB, cnt - w0);
    const float* const* kp = buf.ptrs.data() + w0;
    static_assert(KB <= 6, "keys_scores is instantiated for blocks of up to 6 keys");
    switch (nk) {
      case 6: keys_scores<std::min(KB, 6)>(kp, qt, dim, ld, s); break;
      case 5: keys_scores<std::min(KB, 5)>(kp, qt, dim, ld, s); break;
      case 4: keys_scores<std::min(KB, 4)>(kp, qt, dim, ld, s); break;
      case 3: keys_scores<3>(kp, qt, dim, ld, s); break;
      case 2: keys_scores<2>(kp, qt, dim, ld, s); break;
      default: keys_scores<1>(kp, qt, dim, ld, s); break;
    }
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t w = w0 + j;
      const float* sj = s + j * ld;
      if (!p.some[n * p.width + w]) {
        out[w] = row_max(sj, bs);
        continue;
      }
      const int64_t from = std::max<int64_t>(p.rep_pos[n * p.width + w], 0);
      float mx = NEG_INF;
      for (int64_t c = 0; c < bs; ++c)
        if (pos[c] >= from) mx = std::max(mx, sj[c]);
      out[w] = mx;
    }
  }
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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("key_maxima", &key_maxima, "per row and key row: the best q . k over the row's queries");
}
