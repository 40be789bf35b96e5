// Attention over classified key blocks on CPU, float32, in one pass per query block: exact
// softmax weights on the critical blocks, the first-order expansion of each marginal block around
// the row's expansion point (one pseudo key per marginal block and point), nothing on the rest.
//
// Work items: (batch, KV head, a run of up to 4 query blocks), for every query head of the KV
// head's group, threads pulling them from an atomic counter, the last query blocks first. Per item:
//  1. the summaries of every marginal (query block, key block) pair, with the c expansion points a
//     of all its query heads and blocks stacked into one tall GEMM per run of key blocks: L = a
//     K_j^T, w = exp(scale L - max) per point, z = sum w, k_hat = w K_j / z, v_hat = w V_j / z,
//     base = log z + max - scale a . k_hat (GEMMs: at::native::cpublas::brgemm, as block_sparse);
// then per query head and block:
//  2. the rows owned by point p (gathered): scores scale q . k_hat + base over the marginal blocks
//     (one GEMM per point), merged into each row's online softmax (running max, sum, accumulator)
//     with the values v_hat;
//  3. the critical blocks in runs of consecutive blocks: S = Q K^T, the causal mask by position,
//     the same online softmax, P V.
// A row's output is the accumulator over the sum. Positions are the default layout: query row t
// of the call is at position start + t, key s at position s.

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/extension.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "brgemm_probe.h"
#include "simd.h"

namespace {

constexpr int8_t CRITICAL = 2, MARGINAL = 1;
constexpr int64_t RUN = 4;             // consecutive key blocks per GEMM
constexpr int64_t CHUNK = 256;         // score columns per tile (>= RUN * 64)

struct Problem {
  int64_t B, H, Hkv, Tq, Tk, Tp, D, Dv, bs, nkb, nsel, c, first, start;
  float scale;
  const float* q;        // [B, H, Tq, D]
  const float* kt;       // [B, Hkv, D, Tp]: K^T, zero-padded to Tp = nkb * bs keys
  const float* kv;       // [B, Hkv, Tp, D + Dv]: each key followed by its value, zero-padded
  const int8_t* cls;     // [B, H, nsel, nkb]
  const float* points;   // [B, H, nsel, c, D]
  const int64_t* owner;  // [B, H, Tq]: each row's point
  float* out;            // [B, H, Tq, Dv]
};

// The pseudo keys of one (query head, query block): per point, the expanded marginal blocks:
// pkt [c][D][nm] (k_hat transposed), pv [c][nm][Dv], base [c][nm]; slot[j] is block j's index
// among them (-1: not marginal for this pair).
struct Pseudo {
  std::vector<float> pkt, pv, base;
  std::vector<int64_t> slot;
  int64_t nm = 0;
};

// One worker's online-softmax state over the rows of a query block, and its scratch tiles.
struct Rows {
  std::vector<float> acc, m, l, s, tmp, qg, a, lg, khv;
  std::vector<Pseudo> pairs;
};

// The end of the run of consecutive entries equal to `kind` that starts at j (flags[j] == kind),
// at most RUN entries long and before n.
template <typename T>
inline int64_t run_end(const T* flags, int64_t j, int64_t n, T kind) {
  int64_t e = j + 1;
  while (e < n && e - j < RUN && flags[e] == kind) ++e;
  return e;
}

// s[0:n] = s * scale + bias (bias may be null); returns the maximum.
inline float scale_max(float* s, int64_t n, float scale, const float* bias) {
  const V vs = vset(scale);
  V vm = vset(NEG_INF);
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V x = bias ? vfma(vload(s + j), vs, vload(bias + j)) : vmul(vload(s + j), vs);
    vstore(s + j, x);
    vm = vmax(vm, x);
  }
  float mx = vhmax(vm);
  for (; j < n; ++j) {
    s[j] = bias ? s[j] * scale + bias[j] : s[j] * scale;
    mx = std::max(mx, s[j]);
  }
  return mx;
}

// s[0:n] = exp(s - m); returns their sum.
inline float exp_sum(float* s, int64_t n, float m) {
  const V vneg = vset(-m);
  V acc = vzero();
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V e = vexp(vadd(vload(s + j), vneg));
    vstore(s + j, e);
    acc = vadd(acc, e);
  }
  float sum = vsum(acc);
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// Merge a tile of raw scores s [n, width] (ld) for rows `row[0..n)` into their running state:
// e = exp(scale * s + bias - m_new), accumulator rescaled; e left in s for the P V product.
void merge_scores(Rows& w, float* s, int64_t ld, int64_t n, int64_t width, const int64_t* row,
                  float scale, const float* bias, const int64_t* limit, int64_t Dv) {
  for (int64_t u = 0; u < n; ++u) {
    float* sr = s + u * ld;
    const int64_t r = row ? row[u] : u;
    const int64_t lim = limit ? limit[u] : width;
    const float mx = scale_max(sr, lim, scale, bias);
    const float m_new = std::max(w.m[r], mx);
    if (m_new == NEG_INF) {
      std::fill(sr, sr + width, 0.0f);
      continue;
    }
    const float sum = exp_sum(sr, lim, m_new);
    std::fill(sr + lim, sr + width, 0.0f);
    const float alpha = w.m[r] == NEG_INF ? 0.0f : std::exp(w.m[r] - m_new);
    if (alpha != 1.0f)
      for (int64_t d = 0; d < Dv; ++d) w.acc[r * Dv + d] *= alpha;
    w.l[r] = w.l[r] * alpha + sum;
    w.m[r] = m_new;
  }
}

// An item: batch row b, KV head hkv, query blocks sel0 .. sel0 + nr - 1 (selection indices), for
// every query head of the KV head's group; pair (g, u) is query head hkv * G + g, block sel0 + u.
struct Item {
  int64_t b, hkv, sel0, nr;
};

inline int64_t first_row(const Problem& p, int64_t sel) {
  return std::max(p.start, (p.first + sel) * p.bs);
}

// Step 1: the summaries of the item's marginal blocks for every pair at once: the points of all
// pairs stacked (M = G * nr * c rows), so each GEMM over a run of key blocks is one tall product.
void summaries(const Problem& p, Rows& w, const Item& it) {
  const int64_t D = p.D, Dv = p.Dv, E = D + Dv, bs = p.bs, c = p.c, G = p.H / p.Hkv;
  const int64_t n_pairs = G * it.nr, M = n_pairs * c;
  std::vector<uint8_t> needed(p.nkb, 0);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t u = 0; u < it.nr; ++u) {
      const int64_t h = it.hkv * G + g, sel = it.sel0 + u;
      const int8_t* cls = p.cls + ((it.b * p.H + h) * p.nsel + sel) * p.nkb;
      Pseudo& ps = w.pairs[g * it.nr + u];
      ps.slot.assign(p.nkb, -1);
      ps.nm = 0;
      for (int64_t j = 0, n_prev = first_row(p, sel) / bs; j < n_prev; ++j)
        if (cls[j] == MARGINAL) {
          ps.slot[j] = ps.nm++;
          needed[j] = 1;
        }
      ps.pkt.resize(c * D * ps.nm);
      ps.pv.resize(c * ps.nm * Dv);
      ps.base.resize(c * ps.nm);
      const float* pts = p.points + ((it.b * p.H + h) * p.nsel + sel) * c * D;
      std::copy(pts, pts + c * D, w.a.data() + (g * it.nr + u) * c * D);
    }
  const float* kt = p.kt + (it.b * p.Hkv + it.hkv) * D * p.Tp;
  const float* kv = p.kv + (it.b * p.Hkv + it.hkv) * p.Tp * E;
  float* lg = w.lg.data();    // [M, CHUNK]
  float* khv = w.khv.data();  // [M, D + Dv]
  std::vector<float> top(M), z(M);
  for (int64_t j0 = 0; j0 < p.nkb;) {
    if (!needed[j0]) {
      ++j0;
      continue;
    }
    const int64_t j1 = run_end(needed.data(), j0, p.nkb, uint8_t{1});
    at::native::cpublas::brgemm(M, (j1 - j0) * bs, D, D, p.Tp, CHUNK, false, w.a.data(),
                                kt + j0 * bs, lg, false);
    for (int64_t j = j0; j < j1; ++j) {
      const int64_t u0 = (j - j0) * bs;
      for (int64_t m = 0; m < M; ++m) {
        float* row = lg + m * CHUNK + u0;
        top[m] = scale_max(row, bs, p.scale, nullptr);
        z[m] = exp_sum(row, bs, top[m]);
      }
      at::native::cpublas::brgemm(M, E, bs, CHUNK, E, E, false, lg + u0, kv + j * bs * E, khv,
                                  false);
      for (int64_t q = 0; q < n_pairs; ++q) {
        Pseudo& ps = w.pairs[q];
        const int64_t jj = ps.slot[j], nm = ps.nm;
        if (jj < 0) continue;
        for (int64_t pt = 0; pt < c; ++pt) {
          const int64_t m = q * c + pt;
          const float inv = 1.0f / z[m];
          const float *kh = khv + m * E, *a = w.a.data() + m * D;
          float dot = 0.0f;
          for (int64_t d = 0; d < D; ++d) {
            const float x = kh[d] * inv;
            ps.pkt[(pt * D + d) * nm + jj] = x;
            dot += a[d] * x;
          }
          for (int64_t d = 0; d < Dv; ++d) ps.pv[(pt * nm + jj) * Dv + d] = kh[D + d] * inv;
          ps.base[pt * nm + jj] = std::log(z[m]) + top[m] - p.scale * dot;
        }
      }
    }
    j0 = j1;
  }
}

// Step 2: the rows of each point against its pseudo keys.
void marginal_rows(const Problem& p, Rows& w, const Pseudo& ps, const float* qp,
                   const int64_t* own, int64_t rows) {
  const int64_t D = p.D, Dv = p.Dv, nm = ps.nm;
  std::vector<int64_t> mine;
  for (int64_t pt = 0; pt < p.c; ++pt) {
    mine.clear();
    for (int64_t r = 0; r < rows; ++r)
      if (own[r] == pt) mine.push_back(r);
    const int64_t n = static_cast<int64_t>(mine.size());
    if (n == 0) continue;
    for (int64_t u = 0; u < n; ++u)
      std::copy(qp + mine[u] * D, qp + (mine[u] + 1) * D, w.qg.data() + u * D);
    for (int64_t c0 = 0; c0 < nm; c0 += CHUNK) {
      const int64_t width = std::min(CHUNK, nm - c0);
      float* s = w.s.data();
      at::native::cpublas::brgemm(n, width, D, D, nm, CHUNK, false, w.qg.data(),
                                  ps.pkt.data() + pt * D * nm + c0, s, false);
      merge_scores(w, s, CHUNK, n, width, mine.data(), p.scale, ps.base.data() + pt * nm + c0,
                   nullptr, Dv);
      float* t = w.tmp.data();
      at::native::cpublas::brgemm(n, Dv, width, CHUNK, Dv, Dv, false, s,
                                  ps.pv.data() + (pt * nm + c0) * Dv, t, false);
      for (int64_t u = 0; u < n; ++u)
        for (int64_t d = 0; d < Dv; ++d) w.acc[mine[u] * Dv + d] += t[u * Dv + d];
    }
  }
}

// Step 3: the critical blocks, exact, in runs of consecutive blocks; `lo` is the position of
// the item's first row.
void critical_rows(const Problem& p, Rows& w, const float* qp, int64_t b, int64_t h, int64_t sel,
                   int64_t lo, int64_t rows) {
  const int64_t D = p.D, Dv = p.Dv, E = D + Dv, bs = p.bs, hkv = h / (p.H / p.Hkv);
  const int8_t* cls = p.cls + ((b * p.H + h) * p.nsel + sel) * p.nkb;
  const float* kt = p.kt + (b * p.Hkv + hkv) * D * p.Tp;
  const float* kv = p.kv + (b * p.Hkv + hkv) * p.Tp * E;
  const int64_t last = std::min(p.nkb, (lo + rows - 1) / bs + 1);  // blocks a row can see
  int64_t limit[64];
  for (int64_t j = 0; j < last;) {
    if (cls[j] != CRITICAL) {
      ++j;
      continue;
    }
    const int64_t e = run_end(cls, j, last, CRITICAL), k0 = j * bs, width = (e - j) * bs;
    for (int64_t r = 0; r < rows; ++r)
      limit[r] = std::clamp<int64_t>(std::min(lo + r + 1, p.Tk) - k0, 0, width);
    float* s = w.s.data();
    at::native::cpublas::brgemm(rows, width, D, D, p.Tp, CHUNK, false, qp, kt + k0, s, false);
    merge_scores(w, s, CHUNK, rows, width, nullptr, p.scale, nullptr, limit, Dv);
    at::native::cpublas::brgemm(rows, Dv, width, CHUNK, E, Dv, true, s, kv + k0 * E + D,
                                w.acc.data(), false);
    j = e;
  }
}

// One query block of an item, after its summaries: the marginal rows, the critical blocks, out.
void block_rows(const Problem& p, Rows& w, const Pseudo& ps, int64_t b, int64_t h, int64_t sel) {
  const int64_t bs = p.bs, lo = first_row(p, sel);
  const int64_t rows = std::min(p.Tk, (p.first + sel + 1) * bs) - lo;
  if (rows <= 0) return;
  const float* qp = p.q + ((b * p.H + h) * p.Tq + (lo - p.start)) * p.D;
  const int64_t* own = p.owner + (b * p.H + h) * p.Tq + (lo - p.start);
  std::fill(w.acc.begin(), w.acc.end(), 0.0f);
  std::fill(w.m.begin(), w.m.end(), NEG_INF);
  std::fill(w.l.begin(), w.l.end(), 0.0f);
  if (ps.nm > 0) marginal_rows(p, w, ps, qp, own, rows);
  critical_rows(p, w, qp, b, h, sel, lo, rows);
  float* o = p.out + ((b * p.H + h) * p.Tq + (lo - p.start)) * p.Dv;
  for (int64_t r = 0; r < rows; ++r) {
    const float inv = w.l[r] > 0 ? 1.0f / w.l[r] : 0.0f;
    for (int64_t d = 0; d < p.Dv; ++d) o[r * p.Dv + d] = w.acc[r * p.Dv + d] * inv;
  }
}

void run(const Problem& p) {
  const int64_t G = p.H / p.Hkv, bs = p.bs;
  // query blocks per item: a tall summary GEMM (G * nr * c rows of points); its pseudo keys,
  // nr * G * c * nkb * (D + Dv + 1) floats a worker, kept near 2**22 x G * c (50 MB at 9 / 3
  // heads, 8 points, d 64) at long lengths
  const int64_t nr = std::clamp<int64_t>(4096 / std::max<int64_t>(p.nkb, 1), 1, 4);
  std::vector<Item> items;
  for (int64_t b = 0; b < p.B; ++b)
    for (int64_t hkv = 0; hkv < p.Hkv; ++hkv)
      for (int64_t s0 = 0; s0 < p.nsel; s0 += nr)
        items.push_back({b, hkv, s0, std::min(nr, p.nsel - s0)});
  // the last query blocks cost most: start with them
  std::stable_sort(items.begin(), items.end(),
                   [](const Item& x, const Item& y) { return x.sel0 > y.sel0; });
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_items));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      Rows w;
      const int64_t M = G * nr * p.c;
      w.acc.resize(bs * p.Dv);
      w.m.resize(bs);
      w.l.resize(bs);
      w.s.resize(bs * CHUNK);
      w.tmp.resize(bs * p.Dv);
      w.qg.resize(bs * p.D);
      w.a.resize(M * p.D);
      w.lg.resize(M * CHUNK);
      w.khv.resize(M * (p.D + p.Dv));
      w.pairs.resize(G * nr);
      for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) {
        const Item& it = items[i];
        summaries(p, w, it);
        for (int64_t g = 0; g < G; ++g)
          for (int64_t u = 0; u < it.nr; ++u)
            block_rows(p, w, w.pairs[g * it.nr + u], it.b, it.hkv * G + g, it.sel0 + u);
      }
    }
  });
  at::native::cpublas::brgemm_release(false);
}

at::Tensor attend(const at::Tensor& q, const at::Tensor& kt, const at::Tensor& kv,
                  const at::Tensor& cls, const at::Tensor& points, const at::Tensor& owner,
                  int64_t start, int64_t Tk, int64_t first, int64_t bs, double scale) {
  for (const auto* t : {&q, &kt, &kv, &points})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "expansion: float32");
  TORCH_CHECK(cls.scalar_type() == at::kChar && cls.is_contiguous(), "expansion: int8 classes");
  TORCH_CHECK(owner.scalar_type() == at::kLong && owner.is_contiguous(), "expansion: owner");
  Problem p;
  p.B = q.size(0), p.H = q.size(1), p.Tq = q.size(2), p.D = q.size(3);
  p.Hkv = kv.size(1), p.Tp = kv.size(2), p.Dv = kv.size(3) - p.D, p.bs = bs;
  p.nkb = p.Tp / bs, p.nsel = cls.size(2), p.c = points.size(3);
  p.first = first, p.start = start, p.Tk = Tk;
  TORCH_CHECK(bs <= 64 && p.c <= 64 && p.nkb * bs == p.Tp, "expansion: block and points <= 64");
  TORCH_CHECK(cls.size(3) == p.nkb && kt.size(3) == p.Tp, "expansion: shapes");
  p.scale = static_cast<float>(scale);
  auto out = at::empty({p.B, p.H, p.Tq, p.Dv}, q.options());
  p.q = q.data_ptr<float>(), p.kt = kt.data_ptr<float>(), p.kv = kv.data_ptr<float>();
  p.cls = cls.data_ptr<int8_t>(), p.points = points.data_ptr<float>();
  p.owner = owner.data_ptr<int64_t>(), p.out = out.data_ptr<float>();
  run(p);
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("attend", &attend, "exact critical blocks + expanded marginal blocks, float32");
  m.def("probe", &probe, "empty string when brgemm runs the dtype, else the reason");
}
