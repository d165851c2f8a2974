// The emulator's version of csrc/cuda/ptx.cuh: the same functions, computed on the host
// from the PTX ISA's definitions, so that the attention kernels' own fragment indexing is
// what the tests check.
//
//   ldmatrix.m8n8.x4.trans: lanes 8 i .. 8 i + 7 give the 8 row addresses (16 bytes each)
//     of matrix i; lane l receives in r[i] the elements (row 2 (l % 4), column l / 4) and
//     (row 2 (l % 4) + 1, column l / 4), the first in the low half.
//   mma.m16n8k16 (row.col, fp32 accumulate), with g = l / 4 and t = l % 4:
//     A: a[0] = A[g][2t, 2t+1], a[1] = A[g+8][2t, 2t+1], a[2] = A[g][2t+8, 2t+9],
//        a[3] = A[g+8][2t+8, 2t+9]
//     B: b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//     C: c[0], c[1] = C[g][2t, 2t+1], c[2], c[3] = C[g+8][2t, 2t+1]
#pragma once

#include <cstdint>
#include <cstring>

#include "emulator.h"

namespace pyminigpt::cuda {

__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  emu::queue_async_copy(dst, src, 16, valid ? 16 : 0);
}
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_wait_all() { emu::wait_async_copies(); }

namespace emulated {

inline uint16_t half_at(const void* row, int column) {
  uint16_t x;
  std::memcpy(&x, static_cast<const unsigned char*>(row) + 2 * column, 2);
  return x;
}

inline void resolve_ldmatrix_x4_trans(emu::WarpOp* const* lanes, unsigned) {
  for (int l = 0; l < 32; ++l) {
    auto& r = *static_cast<uint32_t (*)[4]>(lanes[l]->out);
    for (int i = 0; i < 4; ++i) {
      const void* row0 = *static_cast<const void* const*>(lanes[8 * i + 2 * (l % 4)]->in);
      const void* row1 = *static_cast<const void* const*>(lanes[8 * i + 2 * (l % 4) + 1]->in);
      if (reinterpret_cast<uintptr_t>(row0) % 16 != 0 || reinterpret_cast<uintptr_t>(row1) % 16 != 0)
        emu::fail("ldmatrix with a row address that is not 16-byte aligned");
      r[i] = half_at(row0, l / 4) | uint32_t{half_at(row1, l / 4)} << 16;
    }
  }
}

template <typename T>
float element(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * half));
  T x;
  std::memcpy(static_cast<void*>(&x), &bits, 2);
  return static_cast<float>(x);
}

struct MmaIn {
  uint32_t a[4], b[2];
  float c[4];
};

template <typename T>
void resolve_mma_16816(emu::WarpOp* const* lanes, unsigned) {
  float a[16][16], b[16][8], c[16][8];
  for (int l = 0; l < 32; ++l) {
    const auto& in = *static_cast<const MmaIn*>(lanes[l]->in);
    const int g = l / 4, t = l % 4;
    for (int h = 0; h < 2; ++h) {
      a[g][2 * t + h] = element<T>(in.a[0], h);
      a[g + 8][2 * t + h] = element<T>(in.a[1], h);
      a[g][2 * t + 8 + h] = element<T>(in.a[2], h);
      a[g + 8][2 * t + 8 + h] = element<T>(in.a[3], h);
      b[2 * t + h][g] = element<T>(in.b[0], h);
      b[2 * t + 8 + h][g] = element<T>(in.b[1], h);
      c[g][2 * t + h] = in.c[h];
      c[g + 8][2 * t + h] = in.c[2 + h];
    }
  }
  for (int l = 0; l < 32; ++l) {
    float (&d)[4] = *static_cast<float (*)[4]>(lanes[l]->out);
    const int g = l / 4, t = l % 4;
    for (int e = 0; e < 4; ++e) {
      const int row = g + 8 * (e / 2), col = 2 * t + e % 2;
      float sum = c[row][col];
      for (int k = 0; k < 16; ++k) sum += a[row][k] * b[k][col];
      d[e] = sum;
    }
  }
}

}  // namespace emulated

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  emu::WarpOp op{"ldmatrix.x4.trans", 0xffffffffu, &p, &r, emulated::resolve_ldmatrix_x4_trans};
  emu::warp_op(op);
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const emulated::MmaIn in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {c[0], c[1], c[2], c[3]}};
  emu::WarpOp op{"mma.m16n8k16", 0xffffffffu, &in, &c, emulated::resolve_mma_16816<T>};
  emu::warp_op(op);
}

}  // namespace pyminigpt::cuda
