// The vector helpers shared by the C++ kernels: a 16-lane float vector V with one implementation
// per instruction set the compiler targets (-march=native), and the exp / exp2 polynomials written
// once on top of it.
//
//   AVX-512 (F, BW, DQ, VL): one __m512;   AVX2 + FMA: two __m256;   anything else: plain loops.
//
// Every path gives the same answers up to the order of a horizontal sum: max and min follow the
// x86 rule (NaN in either operand gives the second operand), exp / exp2 propagate NaN and give
// exactly 0 for arguments far below the float range (masked -inf scores), rounding to bfloat16 is
// to nearest even. The contents have internal linkage: each extension is its own shared object,
// and no symbol of one must resolve to the other's (they may be built from different headers).
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__)
#define LA_AVX512 1
#else
#define LA_AVX512 0
#endif
#if !LA_AVX512 && defined(__AVX2__) && defined(__FMA__)
#define LA_AVX2 1
#else
#define LA_AVX2 0
#endif
#if LA_AVX512 && defined(__AVX512BF16__)
#define LA_DPBF16 1  // the bf16 dot-product instruction (vdpbf16ps)
#else
#define LA_DPBF16 0
#endif
#if LA_AVX512 || LA_AVX2
#include <immintrin.h>
#endif

// For helpers that only prefetch: GCC deduces that such a function has no side effects and drops
// calls to it that were not inlined first.
#define LA_INLINE inline __attribute__((always_inline))

namespace {

using bf16 = c10::BFloat16;
constexpr int W = 16;  // lanes of a vector
constexpr float LN2 = 0.69314718055994531f;
constexpr float LOG2E = 1.44269504088896341f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

#if LA_AVX512
using Mask = __mmask16;  // bit i: lane i exists
struct V {
  __m512 x;
};
inline V vzero() { return {_mm512_setzero_ps()}; }
inline V vset(float a) { return {_mm512_set1_ps(a)}; }
inline V vload(const float* p) { return {_mm512_loadu_ps(p)}; }
inline V vload(const float* p, Mask m) { return {_mm512_maskz_loadu_ps(m, p)}; }
inline V widen(__m256i h) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
}
inline V vload(const bf16* p) {
  return widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline V vload(const bf16* p, Mask m) { return widen(_mm256_maskz_loadu_epi16(m, p)); }
inline void vstore(float* p, V a) { _mm512_storeu_ps(p, a.x); }
inline void vstore(bf16* p, V a) {
  const __m512i u = _mm512_castps_si512(a.x);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
  const __mmask16 nan = _mm512_cmp_ps_mask(a.x, a.x, _CMP_UNORD_Q);
  const __m512i r = _mm512_mask_mov_epi32(_mm512_srli_epi32(rounded, 16), nan,
                                          _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
inline V vfma(V a, V b, V c) { return {_mm512_fmadd_ps(a.x, b.x, c.x)}; }
inline V vfnma(V a, V b, V c) { return {_mm512_fnmadd_ps(a.x, b.x, c.x)}; }
inline V vmul(V a, V b) { return {_mm512_mul_ps(a.x, b.x)}; }
inline V vadd(V a, V b) { return {_mm512_add_ps(a.x, b.x)}; }
inline V vsub(V a, V b) { return {_mm512_sub_ps(a.x, b.x)}; }
inline V vmax(V a, V b) { return {_mm512_max_ps(a.x, b.x)}; }
inline V vmin(V a, V b) { return {_mm512_min_ps(a.x, b.x)}; }
inline V vround(V a) {
  return {_mm512_roundscale_ps(a.x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)};
}
// a * 2^n for integral n in [-126, 127]
inline V vscale2(V a, V n) { return {_mm512_scalef_ps(a.x, n.x)}; }
// a, with 0 in the lanes where x < t (ordered: NaN lanes keep a)
inline V vzero_below(V a, V x, float t) {
  return {_mm512_mask_mov_ps(a.x, _mm512_cmp_ps_mask(x.x, _mm512_set1_ps(t), _CMP_LT_OQ),
                             _mm512_setzero_ps())};
}
// a, with -inf in the lanes whose byte in m is 0
inline V vmask_bytes(V a, const uint8_t* m) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(m));
  return {_mm512_mask_mov_ps(_mm512_set1_ps(NEG_INF), _mm_test_epi8_mask(bytes, bytes), a.x)};
}
inline float vsum(V a) { return _mm512_reduce_add_ps(a.x); }
inline float vhmax(V a) { return _mm512_reduce_max_ps(a.x); }
// out[i] = the sum of the lanes of a_i, i < 4 (a transposing tree: 11 instructions for all four)
inline void vsum4(V a0, V a1, V a2, V a3, float* out) {
  const __m512 u01 = _mm512_add_ps(_mm512_shuffle_f32x4(a0.x, a1.x, 0x44),
                                   _mm512_shuffle_f32x4(a0.x, a1.x, 0xEE));
  const __m512 u23 = _mm512_add_ps(_mm512_shuffle_f32x4(a2.x, a3.x, 0x44),
                                   _mm512_shuffle_f32x4(a2.x, a3.x, 0xEE));
  // 128-bit lanes: [a0 | a1 | a2 | a3], four partial sums each
  __m512 w = _mm512_add_ps(_mm512_shuffle_f32x4(u01, u23, 0x88),
                           _mm512_shuffle_f32x4(u01, u23, 0xDD));
  w = _mm512_add_ps(w, _mm512_permute_ps(w, 0xB1));
  w = _mm512_add_ps(w, _mm512_permute_ps(w, 0x4E));
  const __m512i pick = _mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  _mm_storeu_ps(out, _mm512_castps512_ps128(_mm512_permutexvar_ps(pick, w)));
}

#elif LA_AVX2
using Mask = uint16_t;  // bit i: lane i exists
struct V {
  __m256 lo, hi;  // lanes 0-7, 8-15
};
inline V vzero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V vset(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline V vload(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
// all-ones 32-bit lanes where bit i of m (i < 8) is set
inline __m256i lane_mask(unsigned m) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(m)), bits), bits);
}
// maskload never touches the lanes it leaves out, so a ragged row end cannot fault
inline V vload(const float* p, Mask m) {
  return {_mm256_maskload_ps(p, lane_mask(m & 0xFFu)),
          _mm256_maskload_ps(p + 8, lane_mask(m >> 8))};
}
inline __m256 widen8(__m128i h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline V vload(const bf16* p) {
  return {widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
          widen8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
}
// no masked 16-bit load before AVX-512: copy the existing lanes (this is only a row's tail)
inline V vload(const bf16* p, Mask m) {
  alignas(32) uint16_t h[W] = {};
  for (int i = 0; i < W; ++i)
    if ((m >> i) & 1) std::memcpy(h + i, p + i, sizeof(uint16_t));
  return vload(reinterpret_cast<const bf16*>(h));
}
inline void vstore(float* p, V a) {
  _mm256_storeu_ps(p, a.lo);
  _mm256_storeu_ps(p + 8, a.hi);
}
inline __m256i to_bf16_bits(__m256 x) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  const __m256i r =
      _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
}
inline void vstore(bf16* p, V a) {
  // packus interleaves the 128-bit halves; the permute puts lanes 0-15 back in order
  const __m256i packed = _mm256_packus_epi32(to_bf16_bits(a.lo), to_bf16_bits(a.hi));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm256_permute4x64_epi64(packed, 0xD8));
}
inline V vfma(V a, V b, V c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline V vfnma(V a, V b, V c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline V vmul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V vadd(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V vsub(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V vmax(V a, V b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V vmin(V a, V b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline V vround(V a) {
  constexpr int mode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(a.lo, mode), _mm256_round_ps(a.hi, mode)};
}
// a * 2^n for integral n in [-126, 127]: 2^n built in the exponent field
inline __m256 pow2(__m256 n) {
  const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
inline V vscale2(V a, V n) {
  return {_mm256_mul_ps(a.lo, pow2(n.lo)), _mm256_mul_ps(a.hi, pow2(n.hi))};
}
inline V vzero_below(V a, V x, float t) {
  const __m256 vt = _mm256_set1_ps(t);
  return {_mm256_andnot_ps(_mm256_cmp_ps(x.lo, vt, _CMP_LT_OQ), a.lo),
          _mm256_andnot_ps(_mm256_cmp_ps(x.hi, vt, _CMP_LT_OQ), a.hi)};
}
inline __m256 mask_bytes8(__m256 a, const uint8_t* m) {
  const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  const __m256 hidden = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bytes, _mm256_setzero_si256()));
  return _mm256_blendv_ps(a, _mm256_set1_ps(NEG_INF), hidden);
}
inline V vmask_bytes(V a, const uint8_t* m) {
  return {mask_bytes8(a.lo, m), mask_bytes8(a.hi, m + 8)};
}
inline float hsum8(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float vsum(V a) { return hsum8(_mm256_add_ps(a.lo, a.hi)); }
inline float vhmax(V a) {
  const __m256 m8 = _mm256_max_ps(a.lo, a.hi);
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

#else
using Mask = uint16_t;  // bit i: lane i exists
struct V {
  float x[W];
};
template <typename F>
inline V lanes(F f) {
  V r;
  for (int i = 0; i < W; ++i) r.x[i] = f(i);
  return r;
}
inline float max_x86(float a, float b) { return a > b ? a : b; }  // NaN: b, as maxps
inline float min_x86(float a, float b) { return a < b ? a : b; }
inline V vzero() { return lanes([](int) { return 0.f; }); }
inline V vset(float a) { return lanes([a](int) { return a; }); }
inline V vload(const float* p) { return lanes([p](int i) { return p[i]; }); }
inline V vload(const float* p, Mask m) {
  return lanes([p, m](int i) { return (m >> i) & 1 ? p[i] : 0.f; });
}
inline V vload(const bf16* p) { return lanes([p](int i) { return static_cast<float>(p[i]); }); }
inline V vload(const bf16* p, Mask m) {
  return lanes([p, m](int i) { return (m >> i) & 1 ? static_cast<float>(p[i]) : 0.f; });
}
inline void vstore(float* p, V a) { std::copy(a.x, a.x + W, p); }
inline void vstore(bf16* p, V a) {
  for (int i = 0; i < W; ++i) p[i] = bf16(a.x[i]);  // c10 rounds to nearest even
}
inline V vfma(V a, V b, V c) {
  return lanes([&](int i) { return std::fma(a.x[i], b.x[i], c.x[i]); });
}
inline V vfnma(V a, V b, V c) {
  return lanes([&](int i) { return std::fma(-a.x[i], b.x[i], c.x[i]); });
}
inline V vmul(V a, V b) { return lanes([&](int i) { return a.x[i] * b.x[i]; }); }
inline V vadd(V a, V b) { return lanes([&](int i) { return a.x[i] + b.x[i]; }); }
inline V vsub(V a, V b) { return lanes([&](int i) { return a.x[i] - b.x[i]; }); }
inline V vmax(V a, V b) { return lanes([&](int i) { return max_x86(a.x[i], b.x[i]); }); }
inline V vmin(V a, V b) { return lanes([&](int i) { return min_x86(a.x[i], b.x[i]); }); }
inline V vround(V a) { return lanes([&](int i) { return std::nearbyint(a.x[i]); }); }
inline V vscale2(V a, V n) { return lanes([&](int i) { return a.x[i] * std::exp2(n.x[i]); }); }
inline V vzero_below(V a, V x, float t) {
  return lanes([&](int i) { return x.x[i] < t ? 0.f : a.x[i]; });
}
inline V vmask_bytes(V a, const uint8_t* m) {
  return lanes([&](int i) { return m[i] ? a.x[i] : NEG_INF; });
}
inline float vsum(V a) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += a.x[i];
  return s;
}
inline float vhmax(V a) {
  float s = a.x[0];
  for (int i = 1; i < W; ++i) s = max_x86(s, a.x[i]);
  return s;
}
#endif

#if !LA_AVX512  // AVX-512 reduces four vectors at once above
inline void vsum4(V a0, V a1, V a2, V a3, float* out) {
  out[0] = vsum(a0);
  out[1] = vsum(a1);
  out[2] = vsum(a2);
  out[3] = vsum(a3);
}
#endif

LA_INLINE void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }     // into L1
LA_INLINE void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }  // into L2

// e^r for |r| <= ln2 / 2: 1 + r + r^2 p(r), the Cephes expf polynomial (about 1 ulp)
inline V exp_reduced(V r) {
  V p = vset(1.9875691500e-4f);
  p = vfma(p, r, vset(1.3981999507e-3f));
  p = vfma(p, r, vset(8.3334519073e-3f));
  p = vfma(p, r, vset(4.1665795894e-2f));
  p = vfma(p, r, vset(1.6666665459e-1f));
  p = vfma(p, r, vset(5.0000001201e-1f));
  return vfma(p, vmul(r, r), vadd(r, vset(1.0f)));
}

// 2^f for |f| <= 1/2: 1 + f q(f), the Cephes exp2f polynomial (about 1 ulp; applying e^r to
// r = f ln2 instead adds the rounding of that product, which fp32 decode tests can see)
inline V exp2_reduced(V f) {
  V q = vset(1.535336188319500e-4f);
  q = vfma(q, f, vset(1.339887440266574e-3f));
  q = vfma(q, f, vset(9.618437357674640e-3f));
  q = vfma(q, f, vset(5.550332471162809e-2f));
  q = vfma(q, f, vset(2.402264791363012e-1f));
  q = vfma(q, f, vset(6.931472028550421e-1f));
  return vfma(q, f, vset(1.0f));
}

// 2^a for a <= 127; exactly 0 below -126 (and for -inf), NaN for NaN (the operand order of
// vmax / vmin passes NaN through).
inline V vexp2(V a) {
  const V x = vmin(vset(127.0f), vmax(vset(-126.0f), a));
  const V n = vround(x);
  return vzero_below(vscale2(exp2_reduced(vsub(x, n)), n), a, -126.0f);
}

// e^a to about 1 ulp; exactly 0 below -87.3 (and -inf), NaN for NaN. ln 2 is split in two
// (Cody-Waite) so that a - n ln2 stays exact.
inline V vexp(V a) {
  const V x = vmin(vset(88.3f), vmax(vset(-87.3f), a));
  const V n = vround(vmul(x, vset(LOG2E)));
  V r = vfnma(n, vset(0.693359375f), x);
  r = vfnma(n, vset(-2.12194440e-4f), r);
  return vzero_below(vscale2(exp_reduced(r), n), a, -87.3f);
}

}  // namespace
