// Causal flash attention on tensor cores: forward, backward, and a split-K decode path.
//
//   S = Q K^T * scale, masked where key j > query i + (Tk - Tq);  P = softmax(S) per row
//   O = P V,  lse_i = log sum_j exp(S_ij)  (natural log, fp32)
//   backward, with D_i = sum_d dO_id O_id:
//     dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = scale dS K,  dK = scale dS^T Q
//
// Memory traffic: the T x T matrices S and P never leave registers. The forward reads Q
// once and K, V once per 64-query block that sees them; it writes O and lse. FLOPs:
// 4 B H Tq Tk D, about half of it skipped by causality (the backward does 2.5x that).
//
// What Triton does for you, spelled out:
//   * Tensor cores: `mma.sync.m16n8k16` (fp16/bf16 in, fp32 accumulate) by inline PTX.
//     A warp multiplies a 16x16 A fragment by a 16x8 B fragment; each lane holds a fixed
//     piece of each (PTX ISA "Matrix Fragments for mma.m16n8k16"): lane = 4 g + t owns
//     rows g and g + 8, columns 2t, 2t + 1 (and + 8). The accumulator layout of S equals
//     the A layout of P, so P goes from the softmax to the next mma without shared memory.
//   * Operands whose k dimension is not contiguous in shared memory (V in P V, Q and dO
//     in the backward) are loaded transposed with `ldmatrix.trans`.
//   * Tiles move global -> shared with `cp.async` (16 bytes, no register round trip), K/V
//     double-buffered so the next tile loads while this one is multiplied. Rows past the
//     end are zero-filled by the copy itself (src-size 0).
//   * Shared rows are padded by 16 bytes: the 8 row addresses of an ldmatrix phase, or a
//     warp's 32-bit fragment loads, then fall in 8 different bank quads.
//   * Online softmax (FlashAttention-2): running row max m and sum l in the log2 domain
//     (exp2 with scale * log2 e folded in), O rescaled by exp2(m_old - m_new) per tile.
//   * Causal schedule: a query block visits only key tiles at or left of its diagonal and
//     applies the mask only on the tiles that cross it; the heaviest query blocks are
//     launched first so the tail of the grid is short.
//   * Decode (Tq == 1): one query cannot fill a tensor core or the GPU, so the keys are
//     split over blocks (split-K); each block streams its keys with 16-byte loads and
//     leaves a partial (m, l, o); a second kernel combines the partials.
//
// Supported: fp16 and bf16, head_dim 64 or 128, Tk >= Tq >= 1; anything else is rejected.
// q, k, v (and dO) are read in place through their strides (`Heads`), so the q, k, v views
// of a fused qkv projection need no copy; every output is written contiguous.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "common.cuh"
#include "ptx.cuh"

namespace pyminigpt::cuda {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockQ = kWarps * 16;  // forward: queries per block, 16 per warp
constexpr int kBlockK = 64;           // keys per tile (forward) / per block (backward)
constexpr int kPad = 8;               // elements of padding per shared-memory row
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Two fp32 values as one register of two 16-bit values (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <typename T>
__device__ __forceinline__ uint32_t load_u32(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// ---------------------------------------------------------------------------------------
// Fragment loads from shared memory (row-major tiles with leading dimension LD).

// A fragment (16x16) of rows [row0, row0 + 16), columns [col0, col0 + 16).
template <int LD, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int row0, int col0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const T* p = tile + (row0 + g) * LD + col0 + 2 * t;
  a[0] = load_u32(p);
  a[1] = load_u32(p + 8 * LD);
  a[2] = load_u32(p + 8);
  a[3] = load_u32(p + 8 * LD + 8);
}

// B fragment (16x8) for B[k][n] = tile[n][k] (k contiguous): n in [n0, n0 + 8), k in [k0, k0 + 16).
template <int LD, typename T>
__device__ __forceinline__ void load_b_kmajor(uint32_t& b0, uint32_t& b1, const T* tile, int n0, int k0) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const T* p = tile + (n0 + g) * LD + k0 + 2 * t;
  b0 = load_u32(p);
  b1 = load_u32(p + 8);
}

// ---------------------------------------------------------------------------------------
// Warp-level matrix products on those fragments.

// acc0 += A B[:, n0 : n0 + 8] and acc1 += A B[:, n0 + 8 : n0 + 16], where B[k][n] =
// tile[k0 + k][n] (n contiguous) is loaded transposed, two n-tiles in one ldmatrix.
template <int LD, typename T>
__device__ __forceinline__ void mma_b_nmajor_x2(float (&acc0)[4], float (&acc1)[4], const uint32_t (&a)[4],
                                                const T* tile, int k0, int n0) {
  const int lane = threadIdx.x % 32;
  uint32_t b[4];
  ldmatrix_x4_trans(b, tile + (k0 + lane % 16) * LD + n0 + (lane / 16) * 8);
  mma_16816<T>(acc0, a, b[0], b[1]);
  mma_16816<T>(acc1, a, b[2], b[3]);
}

// acc[nt] += A B^T over the K = D columns of both tiles: A is rows [a_row0, a_row0 + 16) of
// a_tile, B^T rows [8 nt, 8 nt + 8) of b_tile (both with k contiguous).
template <int D, int LD, int NT, typename T>
__device__ __forceinline__ void mma_a_bt(float (&acc)[NT][4], const T* a_tile, int a_row0, const T* b_tile) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    load_a<LD>(a, a_tile, a_row0, kk * 16);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      uint32_t b0, b1;
      load_b_kmajor<LD>(b0, b1, b_tile, nt * 8, kk * 16);
      mma_16816<T>(acc[nt], a, b0, b1);
    }
  }
}

// The A fragment (16 x 16, in T) of two adjacent fp32 accumulator tiles (16 x 8 each):
// the accumulator layout of C equals the A layout, so no data moves between lanes.
template <typename T>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&lo)[4], const float (&hi)[4]) {
  a[0] = pack2<T>(lo[0], lo[1]);
  a[1] = pack2<T>(lo[2], lo[3]);
  a[2] = pack2<T>(hi[0], hi[1]);
  a[3] = pack2<T>(hi[2], hi[3]);
}

// The rows of one (batch, head) of a `Heads` input: row i starts at rows + i * stride.
// A 32-bit stride (the launchers check it fits) keeps the forward at 128 registers, as with
// packed rows: four blocks per SM at head_dim 64.
template <typename T>
struct HeadRows {
  const T* rows;
  int32_t stride;
  __device__ __forceinline__ const T* row(int64_t i) const { return rows + i * stride; }
};

// Head bh = b * heads + h of t.
template <typename T>
__device__ __forceinline__ HeadRows<T> head_rows(const Heads& t, int64_t bh, int64_t heads) {
  return {static_cast<const T*>(t.data) + bh / heads * t.batch_stride + bh % heads * t.head_stride,
          static_cast<int32_t>(t.row_stride)};
}

// Copies rows [row0, row0 + ROWS) of a head's (n_rows, D) matrix into a padded shared
// tile, zero-filling rows >= n_rows. A pass of the block copies kRowsPerPass whole rows,
// one 16-byte chunk per thread; each thread steps its source pointer by a pass, so the
// row stride costs one register pair, not one address per pass.
template <int ROWS, int D, typename T>
__device__ __forceinline__ void load_tile_async(T* tile, const HeadRows<T>& matrix, int64_t row0, int64_t n_rows) {
  constexpr int kChunksPerRow = D / 8, kRowsPerPass = kThreads / kChunksPerRow;
  static_assert(kThreads % kChunksPerRow == 0 && ROWS % kRowsPerPass == 0);
  const int r0 = threadIdx.x / kChunksPerRow, col = threadIdx.x % kChunksPerRow * 8;
  const T* src = matrix.row(row0 + r0) + col;
  const int64_t pass_stride = kRowsPerPass * matrix.stride;
#pragma unroll
  for (int r = r0; r < ROWS; r += kRowsPerPass, src += pass_stride) {
    const bool valid = row0 + r < n_rows;
    cp_async16(tile + r * (D + kPad) + col, valid ? src : matrix.rows + col, valid);
  }
}

// Max / sum over the 4 lanes of a quad (the lanes sharing rows g and g + 8).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---------------------------------------------------------------------------------------
// Forward. Grid (batch * heads, query blocks); block = 4 warps; warp w owns queries
// [16 w, 16 w + 16) of the block's 64. Shared: Q tile, then two stages of (K, V) tiles.

template <typename T, int D>
__global__ void
__launch_bounds__(kThreads) attention_fwd_kernel(Heads q, Heads k, Heads v, T* __restrict__ out,
                                                                 float* __restrict__ lse, int64_t heads,
                                                                 int64_t q_len, int64_t kv_len, float scale_log2) {
  constexpr int LD = D + kPad;
  constexpr int kTile = kBlockK * LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* q_tile = reinterpret_cast<T*>(smem_raw);
  T* k_tiles = q_tile + kBlockQ * LD;  // [2][kBlockK][LD]
  T* v_tiles = k_tiles + 2 * kTile;    // [2][kBlockK][LD]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.x;
  const int64_t q0 = (int64_t{gridDim.y} - 1 - blockIdx.y) * kBlockQ;  // heaviest blocks first
  const int64_t offset = kv_len - q_len;                               // query i sees keys <= i + offset
  const HeadRows<T> q_head = head_rows<T>(q, bh, heads);
  const HeadRows<T> k_head = head_rows<T>(k, bh, heads);
  const HeadRows<T> v_head = head_rows<T>(v, bh, heads);

  // Key tiles this block visits: up to the one holding key q0 + 63 + offset.
  const int64_t last_key = q0 + kBlockQ - 1 + offset < kv_len - 1 ? q0 + kBlockQ - 1 + offset : kv_len - 1;
  const int n_tiles = static_cast<int>(last_key / kBlockK + 1);

  load_tile_async<kBlockQ, D>(q_tile, q_head, q0, q_len);
  load_tile_async<kBlockK, D>(k_tiles, k_head, 0, kv_len);
  load_tile_async<kBlockK, D>(v_tiles, v_head, 0, kv_len);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  uint32_t q_frag[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) load_a<LD>(q_frag[kk], q_tile, warp * 16, kk * 16);

  float o[D / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8, log2 domain
  float row_sum[2] = {0.f, 0.f};              // this lane's partial sums
  const int64_t query[2] = {q0 + warp * 16 + g, q0 + warp * 16 + g + 8};

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int stage = tile % 2;
    if (tile + 1 < n_tiles) {  // prefetch the next tile into the other stage
      load_tile_async<kBlockK, D>(k_tiles + (1 - stage) * kTile, k_head, int64_t{tile + 1} * kBlockK, kv_len);
      load_tile_async<kBlockK, D>(v_tiles + (1 - stage) * kTile, v_head, int64_t{tile + 1} * kBlockK, kv_len);
      cp_async_commit();
    }
    const T* k_tile = k_tiles + stage * kTile;
    const T* v_tile = v_tiles + stage * kTile;
    const int64_t k0 = int64_t{tile} * kBlockK;

    // S = Q K^T for this warp's 16 queries x 64 keys.
    float s[kBlockK / 8][4] = {};
#pragma unroll
    for (int nt = 0; nt < kBlockK / 8; ++nt) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t b0, b1;
        load_b_kmajor<LD>(b0, b1, k_tile, nt * 8, kk * 16);
        mma_16816<T>(s[nt], q_frag[kk], b0, b1);
      }
    }
    // Scale into the log2 domain; mask only on tiles that cross the diagonal.
    const bool crosses_diagonal = k0 + kBlockK - 1 > q0 + offset;
#pragma unroll
    for (int nt = 0; nt < kBlockK / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[nt][e] *= scale_log2;
        if (crosses_diagonal) {
          const int64_t key = k0 + nt * 8 + 2 * t + (e % 2);
          if (key > query[e / 2] + offset || key >= kv_len) s[nt][e] = -INFINITY;
        }
      }
    }
    // Online softmax: new row max, rescale the running sum and O, P = exp2(S - max).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = -INFINITY;
#pragma unroll
      for (int nt = 0; nt < kBlockK / 8; ++nt) tile_max = fmaxf(tile_max, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      const float new_max = fmaxf(row_max[r], quad_max(tile_max));
      const float base = new_max == -INFINITY ? 0.f : new_max;  // a row with nothing seen yet
      const float alpha = exp2f(row_max[r] - base);
      row_max[r] = new_max;
      float tile_sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < kBlockK / 8; ++nt) {
        s[nt][2 * r] = exp2f(s[nt][2 * r] - base);
        s[nt][2 * r + 1] = exp2f(s[nt][2 * r + 1] - base);
        tile_sum += s[nt][2 * r] + s[nt][2 * r + 1];
      }
      row_sum[r] = row_sum[r] * alpha + tile_sum;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[dt][2 * r] *= alpha;
        o[dt][2 * r + 1] *= alpha;
      }
    }
    // O += P V: the S accumulators are P's A fragments (two n-tiles per 16-key chunk).
#pragma unroll
    for (int kc = 0; kc < kBlockK / 16; ++kc) {
      uint32_t p_frag[4];
      acc_to_a<T>(p_frag, s[2 * kc], s[2 * kc + 1]);
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) mma_b_nmajor_x2<LD>(o[dt], o[dt + 1], p_frag, v_tile, kc * 16, dt * 8);
    }
    cp_async_wait_all();  // the next tile has landed ...
    __syncthreads();      // ... for every warp, and nobody still reads this stage
  }

  // O / l, and lse = (m + log2 l) ln 2.
  T* out_head = out + bh * q_len * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(row_sum[r]);
    const int64_t i = query[r];
    if (i >= q_len) continue;
    const float inv_l = 1.f / l;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const uint32_t packed = pack2<T>(o[dt][2 * r] * inv_l, o[dt][2 * r + 1] * inv_l);
      *reinterpret_cast<uint32_t*>(out_head + i * D + dt * 8 + 2 * t) = packed;
    }
    if (t == 0) lse[bh * q_len + i] = (row_max[r] + log2f(l)) * kLn2;
  }
}

// ---------------------------------------------------------------------------------------
// Decode (q_len == 1): split-K over the keys, then a combine.
//
// Each block takes one (batch, head) and a contiguous chunk of keys. A key row is read by
// a group of D / 8 lanes, 16 bytes each (8 elements), so a warp covers 32 / (D / 8) keys
// per step. Every group keeps its own (m, l, o[8 per lane]); the block merges its groups
// through shared memory and writes one unnormalised partial per split.

template <int D>
constexpr int kDecodeGroup = D / 8;  // lanes per key row
template <int D>
constexpr int kDecodeStates = kWarps * 32 / kDecodeGroup<D>;  // key groups per block

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_decode_partial_kernel(
    Heads q, Heads k, Heads v, float* __restrict__ partial_o, float* __restrict__ partial_m,
    float* __restrict__ partial_l, int64_t heads, int64_t kv_len, int64_t keys_per_split, float scale_log2) {
  constexpr int G = kDecodeGroup<D>;
  constexpr int kStates = kDecodeStates<D>;
  __shared__ float state_m[kStates], state_l[kStates];
  __shared__ float state_o[kStates][D];

  const int64_t bh = blockIdx.x, split = blockIdx.y, n_splits = gridDim.y;
  const int group = threadIdx.x / G, sub = threadIdx.x % G;  // key group, and lane within it
  const int dim0 = sub * 8;
  const HeadRows<T> k_head = head_rows<T>(k, bh, heads);
  const HeadRows<T> v_head = head_rows<T>(v, bh, heads);

  float q_reg[8];
  const Pack<T, 8> q_pack = load_pack<T, 8>(head_rows<T>(q, bh, heads).row(0) + dim0);
#pragma unroll
  for (int e = 0; e < 8; ++e) q_reg[e] = to_float(q_pack.v[e]) * scale_log2;

  const int64_t begin = split * keys_per_split;
  const int64_t end = begin + keys_per_split < kv_len ? begin + keys_per_split : kv_len;
  float m = -INFINITY, l = 0.f, acc[8] = {};
  // Every lane runs the same number of steps (the shuffles need the whole warp).
  for (int64_t base = begin; base < end; base += kStates) {
    const int64_t j = base + group;
    const bool valid = j < end;
    const Pack<T, 8> k_pack = load_pack<T, 8>(k_head.row(valid ? j : begin) + dim0);
    const Pack<T, 8> v_pack = load_pack<T, 8>(v_head.row(valid ? j : begin) + dim0);
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) dot += q_reg[e] * to_float(k_pack.v[e]);
#pragma unroll
    for (int offset = G / 2; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    if (!valid) continue;
    const float new_m = fmaxf(m, dot);
    const float alpha = exp2f(m - new_m);  // m = -inf on the first key: alpha = 0
    const float p = exp2f(dot - new_m);
    l = l * alpha + p;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[e] = acc[e] * alpha + p * to_float(v_pack.v[e]);
    m = new_m;
  }
  if (sub == 0) {
    state_m[group] = m;
    state_l[group] = l;
  }
#pragma unroll
  for (int e = 0; e < 8; ++e) state_o[group][dim0 + e] = acc[e];
  __syncthreads();

  // Merge the block's groups: thread d < D owns output dimension d.
  float block_m = -INFINITY;
  for (int s = 0; s < kStates; ++s) block_m = fmaxf(block_m, state_m[s]);
  const int64_t slot = bh * n_splits + split;
  for (int d = threadIdx.x; d < D; d += kThreads) {
    float o_d = 0.f, l_sum = 0.f;
    for (int s = 0; s < kStates; ++s) {
      const float w = state_m[s] == -INFINITY ? 0.f : exp2f(state_m[s] - block_m);
      o_d += state_o[s][d] * w;
      l_sum += state_l[s] * w;
    }
    partial_o[slot * D + d] = o_d;
    if (d == 0) {
      partial_m[slot] = block_m;
      partial_l[slot] = l_sum;
    }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(D) attention_decode_combine_kernel(const float* __restrict__ partial_o,
                                                                     const float* __restrict__ partial_m,
                                                                     const float* __restrict__ partial_l,
                                                                     T* __restrict__ out, float* __restrict__ lse,
                                                                     int n_splits) {
  const int64_t bh = blockIdx.x;
  const int d = threadIdx.x;
  float m = -INFINITY;
  for (int s = 0; s < n_splits; ++s) m = fmaxf(m, partial_m[bh * n_splits + s]);
  float l = 0.f, o = 0.f;
  for (int s = 0; s < n_splits; ++s) {
    const int64_t slot = bh * n_splits + s;
    const float w = partial_m[slot] == -INFINITY ? 0.f : exp2f(partial_m[slot] - m);
    l += partial_l[slot] * w;
    o += partial_o[slot * D + d] * w;
  }
  out[bh * D + d] = from_float<T>(o / l);
  if (d == 0) lse[bh] = (m + log2f(l)) * kLn2;
}

struct DecodeSplit {
  int n_splits;
  int64_t keys_per_split;
};

// Enough (batch, head, split) blocks for two waves over the SMs, at least 128 keys each.
DecodeSplit decode_split(int64_t batch_heads, int64_t kv_len) {
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t wanted = (2 * int64_t{sms} + batch_heads - 1) / batch_heads;
  const int64_t most = (kv_len + 127) / 128;
  const int64_t splits = wanted < most ? wanted : most;  // >= 1
  const int64_t per_split = (kv_len + splits - 1) / splits;
  return {static_cast<int>((kv_len + per_split - 1) / per_split), per_split};
}

// ---------------------------------------------------------------------------------------
// Backward. Grid (batch * heads, key blocks of 64); warp w owns keys [16 w, 16 w + 16) of
// the block and accumulates their dK, dV in registers over every query tile that sees
// them. S, P, dP and dS are computed transposed (keys as rows), so P^T and dS^T are A
// fragments for dV += P^T dO and dK += dS^T Q straight from the accumulators. dQ needs
// dS with queries as rows: dS^T goes through shared memory, and each block adds its
// share of dQ to an fp32 accumulator with atomics.

template <int D>
constexpr int kBwdBlockQ = D == 64 ? 64 : 32;  // queries per tile (registers bound it at D = 128)

template <typename T, int D>
constexpr size_t bwd_smem_bytes() {
  // K, V tiles; Q, dO tiles; the dS tile; lse and delta.
  return sizeof(T) * ((2 * size_t{kBlockK} + 2 * kBwdBlockQ<D>) * (D + kPad) + kBwdBlockQ<D> * (kBlockK + kPad)) +
         2 * sizeof(float) * kBwdBlockQ<D>;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_bwd_kernel(
    Heads grad_out, Heads q, Heads k, Heads v, const float* __restrict__ lse, const float* __restrict__ delta,
    float* __restrict__ dq_accum, T* __restrict__ grad_k, T* __restrict__ grad_v, int64_t heads, int64_t q_len,
    int64_t kv_len, float scale, float scale_log2) {
  constexpr int LD = D + kPad;
  constexpr int BQ = kBwdBlockQ<D>;
  constexpr int LDS = kBlockK + kPad;  // dS tile: [BQ][keys]
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* k_tile = reinterpret_cast<T*>(smem_raw);  // [kBlockK][LD]
  T* v_tile = k_tile + kBlockK * LD;           // [kBlockK][LD]
  T* q_tile = v_tile + kBlockK * LD;           // [BQ][LD]
  T* do_tile = q_tile + BQ * LD;               // [BQ][LD]
  T* ds_tile = do_tile + BQ * LD;              // [BQ][LDS]
  float* lse_tile = reinterpret_cast<float*>(ds_tile + BQ * LDS);  // [BQ], log2 domain
  float* delta_tile = lse_tile + BQ;                               // [BQ]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t bh = blockIdx.x;
  const int64_t k0 = int64_t{blockIdx.y} * kBlockK;
  const int64_t offset = kv_len - q_len;
  const HeadRows<T> q_head = head_rows<T>(q, bh, heads);
  const HeadRows<T> do_head = head_rows<T>(grad_out, bh, heads);
  const HeadRows<T> k_head = head_rows<T>(k, bh, heads);
  const HeadRows<T> v_head = head_rows<T>(v, bh, heads);
  const float* lse_head = lse + bh * q_len;
  const float* delta_head = delta + bh * q_len;
  float* dq_head = dq_accum + bh * q_len * D;

  load_tile_async<kBlockK, D>(k_tile, k_head, k0, kv_len);
  load_tile_async<kBlockK, D>(v_tile, v_head, k0, kv_len);
  cp_async_commit();

  float dk[D / 8][4] = {};
  float dv[D / 8][4] = {};
  const int64_t key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};

  // The first query that sees key k0 is k0 - offset.
  const int64_t q_begin = k0 - offset > 0 ? (k0 - offset) / BQ * BQ : 0;
  for (int64_t q0 = q_begin; q0 < q_len; q0 += BQ) {
    load_tile_async<BQ, D>(q_tile, q_head, q0, q_len);
    load_tile_async<BQ, D>(do_tile, do_head, q0, q_len);
    cp_async_commit();
    for (int i = threadIdx.x; i < BQ; i += kThreads) {
      const bool valid = q0 + i < q_len;  // a query past the end gets P = 0 through lse = +inf
      lse_tile[i] = valid ? lse_head[q0 + i] * kLog2e : INFINITY;
      delta_tile[i] = valid ? delta_head[q0 + i] : 0.f;
    }
    cp_async_wait_all();
    __syncthreads();

    // S^T = K Q^T (16 keys x BQ queries per warp), then P^T = exp2(S^T scale log2e - lse).
    float p[BQ / 8][4] = {};
    mma_a_bt<D, LD>(p, k_tile, warp * 16, q_tile);
    const bool crosses_diagonal = q0 + offset < k0 + kBlockK - 1;
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * t + (e % 2);
        const bool masked = crosses_diagonal && key[e / 2] > q0 + col + offset;
        p[nt][e] = masked ? 0.f : exp2f(p[nt][e] * scale_log2 - lse_tile[col]);
      }
    }

    // dP^T = V dO^T.
    float dp[BQ / 8][4] = {};
    mma_a_bt<D, LD>(dp, v_tile, warp * 16, do_tile);

    // dV += P^T dO and dK += dS^T Q, with dS^T = P^T (dP^T - delta); dS^T also to shared.
#pragma unroll
    for (int kc = 0; kc < BQ / 16; ++kc) {
      float ds[2][4];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = (2 * kc + h) * 8 + 2 * t + (e % 2);
          ds[h][e] = p[2 * kc + h][e] * (dp[2 * kc + h][e] - delta_tile[col]);
        }
      }
      uint32_t p_frag[4], ds_frag[4];
      acc_to_a<T>(p_frag, p[2 * kc], p[2 * kc + 1]);
      acc_to_a<T>(ds_frag, ds[0], ds[1]);
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        mma_b_nmajor_x2<LD>(dv[dt], dv[dt + 1], p_frag, do_tile, kc * 16, dt * 8);
        mma_b_nmajor_x2<LD>(dk[dt], dk[dt + 1], ds_frag, q_tile, kc * 16, dt * 8);
      }
      // ds_tile[query][key] = dS^T[key][query] (transposed, 16-bit stores).
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int col = (2 * kc + h) * 8 + 2 * t + (e % 2);
          const int row = warp * 16 + g + 8 * (e / 2);
          ds_tile[col * LDS + row] = from_float<T>(ds[h][e]);
        }
      }
    }
    __syncthreads();

    // dQ[q0 : q0 + BQ] += scale dS K: jobs of (16 queries x 16 dims) spread over the warps.
    constexpr int kDimPairs = D / 16;
    for (int job = warp; job < (BQ / 16) * kDimPairs; job += kWarps) {
      const int mt = job / kDimPairs, dt = (job % kDimPairs) * 2;
      float acc[2][4] = {};
#pragma unroll
      for (int kc = 0; kc < kBlockK / 16; ++kc) {
        uint32_t a[4];
        load_a<LDS>(a, ds_tile, mt * 16, kc * 16);
        mma_b_nmajor_x2<LD>(acc[0], acc[1], a, k_tile, kc * 16, dt * 8);
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int64_t i = q0 + mt * 16 + g + 8 * (e / 2);
          if (i < q_len) atomicAdd(dq_head + i * D + (dt + h) * 8 + 2 * t + (e % 2), acc[h][e] * scale);
        }
      }
    }
    // No barrier before the next tile: its loads overwrite q_tile, do_tile, lse_tile and
    // delta_tile, which nobody reads after the barrier above, and it writes ds_tile only
    // after its first barrier, which no warp passes before finishing this dQ loop.
  }

  // Store dK = scale dS^T Q and dV for the block's valid keys.
  T* dk_head = grad_k + bh * kv_len * D;
  T* dv_head = grad_v + bh * kv_len * D;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (key[r] >= kv_len) continue;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int64_t at = key[r] * D + dt * 8 + 2 * t;
      *reinterpret_cast<uint32_t*>(dk_head + at) = pack2<T>(dk[dt][2 * r] * scale, dk[dt][2 * r + 1] * scale);
      *reinterpret_cast<uint32_t*>(dv_head + at) = pack2<T>(dv[dt][2 * r], dv[dt][2 * r + 1]);
    }
  }
}

// delta_i = sum_d dO_id O_id, one warp per row (bh q_len + i) of the (batch * heads * q_len) rows.
template <typename T>
__global__ void attention_bwd_delta_kernel(Heads grad_out, const T* __restrict__ out, float* __restrict__ delta,
                                           int64_t heads, int64_t q_len, int64_t n_rows, int head_dim) {
  const int64_t row = int64_t{blockIdx.x} * kWarps + threadIdx.x / 32;
  if (row >= n_rows) return;
  const T* do_row = head_rows<T>(grad_out, row / q_len, heads).row(row % q_len);
  float dot = 0.f;
  for (int d = threadIdx.x % 32; d < head_dim; d += 32)
    dot += to_float(do_row[d]) * to_float(out[row * head_dim + d]);
  dot = warp_sum(dot);
  if (threadIdx.x % 32 == 0) delta[row] = dot;
}

template <typename T>
__global__ void convert_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    dst[i] = from_float<T>(src[i]);
}

template <typename T, int D>
constexpr size_t fwd_smem_bytes() {
  return sizeof(T) * (kBlockQ + 4 * kBlockK) * (D + kPad);
}

template <typename T, int D>
cudaError_t launch_fwd(Heads q, Heads k, Heads v, T* out, float* lse, void* workspace, int64_t batch,
                       int64_t heads, int64_t q_len, int64_t kv_len, float scale_log2, cudaStream_t stream) {
  const int64_t bh = batch * heads;
  if (q_len == 1) {
    const DecodeSplit split = decode_split(bh, kv_len);
    float* partial_o = static_cast<float*>(workspace);
    float* partial_m = partial_o + bh * split.n_splits * D;
    float* partial_l = partial_m + bh * split.n_splits;
    attention_decode_partial_kernel<T, D><<<dim3(static_cast<unsigned>(bh), split.n_splits), kThreads, 0, stream>>>(
        q, k, v, partial_o, partial_m, partial_l, heads, kv_len, split.keys_per_split, scale_log2);
    PYMINIGPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());
    attention_decode_combine_kernel<T, D><<<static_cast<unsigned>(bh), D, 0, stream>>>(partial_o, partial_m,
                                                                                       partial_l, out, lse,
                                                                                       split.n_splits);
    return cudaGetLastError();
  }
  constexpr size_t smem = fwd_smem_bytes<T, D>();
  PYMINIGPT_CUDA_RETURN_IF_ERROR(allow_dynamic_smem(attention_fwd_kernel<T, D>, smem));
  const dim3 grid(static_cast<unsigned>(bh), static_cast<unsigned>((q_len + kBlockQ - 1) / kBlockQ));
  attention_fwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(q, k, v, out, lse, heads, q_len, kv_len, scale_log2);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_bwd(Heads grad_out, Heads q, Heads k, Heads v, const T* out, const float* lse, T* grad_q,
                       T* grad_k, T* grad_v, void* workspace, int64_t batch, int64_t heads, int64_t q_len,
                       int64_t kv_len, float scale, cudaStream_t stream) {
  const int64_t bh = batch * heads;
  float* dq_accum = static_cast<float*>(workspace);
  float* delta = dq_accum + bh * q_len * D;
  const int64_t rows = bh * q_len;
  PYMINIGPT_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(dq_accum, 0, sizeof(float) * rows * D, stream));
  attention_bwd_delta_kernel<T><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(
      grad_out, out, delta, heads, q_len, rows, D);
  PYMINIGPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());

  constexpr size_t smem = bwd_smem_bytes<T, D>();
  PYMINIGPT_CUDA_RETURN_IF_ERROR(allow_dynamic_smem(attention_bwd_kernel<T, D>, smem));
  const dim3 grid(static_cast<unsigned>(bh), static_cast<unsigned>((kv_len + kBlockK - 1) / kBlockK));
  attention_bwd_kernel<T, D><<<grid, kThreads, smem, stream>>>(grad_out, q, k, v, lse, delta, dq_accum, grad_k,
                                                               grad_v, heads, q_len, kv_len, scale, scale * kLog2e);
  PYMINIGPT_CUDA_RETURN_IF_ERROR(cudaGetLastError());

  const int64_t n = rows * D;
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256 < 65536 ? (n + 255) / 256 : 65536);
  convert_kernel<T><<<blocks, 256, 0, stream>>>(dq_accum, grad_q, n);
  return cudaGetLastError();
}

// Checks the arguments, then calls body(T{}, std::integral_constant<int, D>{}) for the
// (dtype, head_dim) of a supported input.
template <typename Body>
cudaError_t dispatch_attention(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len, int64_t head_dim,
                               DType dtype, std::initializer_list<Heads> inputs, Body&& body) {
  if (causal_attention_unsupported(batch, heads, q_len, kv_len, head_dim, dtype) != nullptr)
    return cudaErrorInvalidValue;
  for (const Heads& t : inputs)
    if (!heads_readable(t, dtype)) return cudaErrorInvalidValue;
  auto with_dim = [&](auto tag) -> cudaError_t {
    if (head_dim == 64) return body(tag, std::integral_constant<int, 64>{});
    if (head_dim == 128) return body(tag, std::integral_constant<int, 128>{});
    return cudaErrorInvalidValue;
  };
  if (dtype == DType::kFloat16) return with_dim(__half{});
  if (dtype == DType::kBFloat16) return with_dim(__nv_bfloat16{});
  return cudaErrorInvalidValue;
}

}  // namespace

// 16-byte copies need the start and every stride to be multiples of 16 bytes, and HeadRows
// keeps the row stride in 32 bits.
bool heads_readable(const Heads& t, DType dtype) {
  const int64_t bytes = dtype == DType::kFloat32 ? 4 : 2;
  return reinterpret_cast<uintptr_t>(t.data) % 16 == 0 && t.batch_stride * bytes % 16 == 0 &&
         t.head_stride * bytes % 16 == 0 && t.row_stride * bytes % 16 == 0 && t.row_stride <= INT32_MAX;
}

const char* causal_attention_unsupported(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                                         int64_t head_dim, DType dtype) {
  if (dtype != DType::kFloat16 && dtype != DType::kBFloat16) return "causal_attention: dtype must be fp16 or bf16";
  if (head_dim != 64 && head_dim != 128) return "causal_attention: head_dim must be 64 or 128";
  if (batch < 1 || heads < 1 || q_len < 1) return "causal_attention: batch, heads and q_len must be >= 1";
  if (kv_len < q_len) return "causal_attention: kv_len must be >= q_len";
  if (batch * heads > int64_t{INT32_MAX}) return "causal_attention: batch * heads must be < 2^31";
  if (kv_len > int64_t{65535} * kBlockK) return "causal_attention: kv_len must be <= 65535 * 64";
  return nullptr;
}

size_t causal_attention_fwd_workspace_bytes(int64_t batch, int64_t heads, int64_t q_len, int64_t kv_len,
                                            int64_t head_dim) {
  if (q_len != 1) return 0;
  const DecodeSplit split = decode_split(batch * heads, kv_len);
  return sizeof(float) * static_cast<size_t>(batch * heads * split.n_splits * (head_dim + 2));
}

cudaError_t causal_attention_fwd(Heads q, Heads k, Heads v, void* out, float* lse, void* workspace, int64_t batch,
                                 int64_t heads, int64_t q_len, int64_t kv_len, int64_t head_dim, float scale,
                                 DType dtype, cudaStream_t stream) {
  return dispatch_attention(batch, heads, q_len, kv_len, head_dim, dtype, {q, k, v}, [&](auto tag, auto dim) {
    using T = decltype(tag);
    return launch_fwd<T, decltype(dim)::value>(q, k, v, static_cast<T*>(out), lse, workspace, batch, heads, q_len,
                                               kv_len, scale * kLog2e, stream);
  });
}

size_t causal_attention_bwd_workspace_bytes(int64_t batch, int64_t heads, int64_t q_len, int64_t head_dim) {
  return sizeof(float) * static_cast<size_t>(batch * heads * q_len * (head_dim + 1));
}

cudaError_t causal_attention_bwd(Heads grad_out, Heads q, Heads k, Heads v, const void* out, const float* lse,
                                 void* grad_q, void* grad_k, void* grad_v, void* workspace, int64_t batch,
                                 int64_t heads, int64_t q_len, int64_t kv_len, int64_t head_dim, float scale,
                                 DType dtype, cudaStream_t stream) {
  return dispatch_attention(
      batch, heads, q_len, kv_len, head_dim, dtype, {grad_out, q, k, v}, [&](auto tag, auto dim) {
        using T = decltype(tag);
        return launch_bwd<T, decltype(dim)::value>(grad_out, q, k, v, static_cast<const T*>(out), lse,
                                                   static_cast<T*>(grad_q), static_cast<T*>(grad_k),
                                                   static_cast<T*>(grad_v), workspace, batch, heads, q_len, kv_len,
                                                   scale, stream);
      });
}

}  // namespace pyminigpt::cuda
