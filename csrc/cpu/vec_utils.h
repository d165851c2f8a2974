// Loads and stores between a tensor's element type and Vectorized<float>, lane reductions,
// and the grain of the row-wise kernels' at::parallel_for.
//
// The CPU kernels compute in fp32 whatever the storage type (float or bfloat16), one
// Vectorized<float> (8 lanes with AVX2, 16 with AVX-512) at a time. Include this only
// from a csrc/cpu/<op>.cpp file: it lives in that file's CPU_CAPABILITY namespace.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <functional>
#include <type_traits>

// Runs the lambda with scalar_t = float or c10::BFloat16, the storage types the CPU kernels take.
#define PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

namespace pyminigpt::cpu::CPU_CAPABILITY {

using fVec = at::vec::Vectorized<float>;

// Loads `count` (<= fVec::size()) elements starting at p as floats; missing lanes are 0.
template <typename scalar_t>
inline fVec load_float(const scalar_t* p, int64_t count = fVec::size()) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return count == fVec::size() ? fVec::loadu(p) : fVec::loadu(p, count);
  } else {
    fVec out;
    if (count == fVec::size()) {
      at::vec::load_to_float(p, out);
    } else {
      scalar_t buffer[fVec::size()] = {};
      std::copy(p, p + count, buffer);
      at::vec::load_to_float(buffer, out);
    }
    return out;
  }
}

// Stores the first `count` (<= fVec::size()) lanes of v at p, rounding to scalar_t.
template <typename scalar_t>
inline void store_float(const fVec& v, scalar_t* p, int64_t count = fVec::size()) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    v.store(p, count);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
  }
}

// The largest of v's lanes.
inline float reduce_max(const fVec& v) {
  return at::vec::vec_reduce_all<float>([](const fVec& a, const fVec& b) { return at::vec::maximum(a, b); }, v);
}
// The sum of v's lanes.
inline float reduce_sum(const fVec& v) { return at::vec::vec_reduce_all<float>(std::plus<fVec>(), v); }

// Rows per parallel task for rows of `row_width` elements: enough elements (~32k) to
// amortise the task overhead, and at least one row (also for empty rows).
inline int64_t rows_per_task(int64_t row_width) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_width, 1));
}

}  // namespace pyminigpt::cpu::CPU_CAPABILITY
