// Whether oneDNN's brgemm micro-kernel (at::native::cpublas::brgemm, the GEMM of the block-sparse
// and expansion kernels) runs a dtype on this CPU: "" if it does, else its error text. It runs a
// 4 x 4 product rather than reading CPU flags, so it follows torch's own rule. Internal linkage,
// as simd.h: each extension is its own shared object.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <exception>
#include <string>

namespace {

// dtype: "float32" or "bfloat16".
inline std::string probe(const std::string& dtype) {
  try {
    float c[4 * 4];
    if (dtype == "float32") {
      float a[4 * 4] = {0}, b[4 * 4] = {0};
      at::native::cpublas::brgemm(4, 4, 4, 4, 4, 4, false, a, b, c, false);
    } else {
      at::BFloat16 a[4 * 4], b[4 * 4];
      std::fill(a, a + 16, at::BFloat16(0.0f));
      std::fill(b, b + 16, at::BFloat16(0.0f));
      at::native::cpublas::brgemm(4, 4, 4, 4, 4, 4, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
    }
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

}  // namespace
