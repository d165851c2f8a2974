// Causal attention the FlashAttention way, forward and backward, on the CPU.
//
// Per batch b and head h, with q (Tq, D), k and v (Tk, D), Tk >= Tq, offset = Tk - Tq:
//
//   S = scale * q k^T,  S_ij = -inf where j > i + offset  (query i sees keys j <= i + offset)
//   P = softmax_rows(S),   out = P v,   lse_i = log sum_j exp(S_ij)
//
// Backward (FlashAttention-2), P recomputed from the saved lse as exp(S - lse):
//
//   dv = P^T dout,   dP = dout v^T,   delta_i = sum_d dout_id out_id,   dS = P * (dP - delta)
//   dq = scale * dS k,   dk = scale * dS^T q
//
// Forward. One task per (b, h) -- or per (b, h, every n-th query block) when there are
// fewer heads than threads -- packs the head's k (transposed) and v once, then for each
// block of kBlockQ queries walks the key blocks of up to kFwdBlockK keys from the left
// up to the diagonal (blocks above it are never touched), keeping per query row the
// running max m, the running sum l and the unnormalised output O, all fp32 (the online
// softmax):
//
//   m' = max(m, rowmax S_blk),  P = exp(S_blk - m'),  l' = l exp(m - m') + rowsum P,
//   O' = O exp(m - m') + P v_blk
//
// and finally writes out = O / l and lse = m + log l. At most kBlockQ x kFwdBlockK scores
// exist at a time; nothing of size Tq x Tk is ever allocated.
//
// Backward. One task per (b, h): for each block of kBwdBlockK keys, the query blocks from
// the diagonal down recompute S and P, and accumulate dk and dv of the key block in fp32
// buffers and dq in an fp32 (Tq, D) buffer that the task owns (so no atomics).
//
// Decoding (Tq == 1) is a row, not a tile: one task per (b, h) computes the Tk scores
// with dot products along D, their softmax and P v. When there are fewer heads than
// threads the keys are split into ranges whose results are merged by the rule above.
//
// Memory traffic (elements, per head, Tq = Tk = T, fp32 scratch per thread ~2 T D):
//   forward:  q, k, v and out once from memory (4 T D); k and v are then re-read from the
//             packed copy (L2) by each query block, T^2 D / kBlockQ in all;
//   backward: q, k, v, out, dout, dq, dk, dv once (8 T D); q and dout re-read from L2 by
//             each key block, ~T^2 D / kBwdBlockK;
//   decode:   k and v once, 2 Tk D: memory-bound, it runs at the speed of DRAM.
//
// The matmuls are one register-tiled micro-kernel: C += A B with B's rows loaded as
// vectors and A's elements broadcast one at a time from any strides, so A^T (P^T, dS^T)
// costs nothing. Inputs are float or bfloat16 with any strides except the last (a
// non-contiguous last dim costs one copy); they are converted to fp32 while packed into
// per-task blocks (k transposed for q k^T, rows zero-padded to a whole number of vectors).
// Outputs are contiguous, in the input dtype; lse is fp32 (B, H, Tq).
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace pyminigpt::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t W = fVec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Micro-kernel tile: kTileRows rows x kTileVecs vectors of C live in registers
// (16 of the 32 AVX-512 registers; 8 of the 16 AVX2 ones).
constexpr int kTileRows = 4;
#if defined(CPU_CAPABILITY_AVX512)
constexpr int kTileVecs = 4;
#else
constexpr int kTileVecs = 2;
#endif

// Block sizes. The forward's per-row softmax bookkeeping (two reductions, the rescale of
// the output row) is paid once per key block, so its key blocks are long; the backward
// keeps dk and dv of a key block in fp32 buffers that should stay in L1, so its are short.
constexpr int64_t kBlockQ = 64;      // queries per block
constexpr int64_t kFwdBlockK = 256;  // keys per forward block
constexpr int64_t kBwdBlockK = 64;   // keys per backward block
// The forward packs k^T of a head as panels of kKeyPanel keys, each (D, kKeyPanel) and
// contiguous: rows of a long (D, Tk) k^T would be a multiple of 4 KiB apart and fight
// over the same L1 sets.
constexpr int64_t kKeyPanel = 64;
static_assert(kFwdBlockK % kKeyPanel == 0 && kKeyPanel % (kTileVecs * W) == 0);
static_assert(kBlockQ % kTileRows == 0 && kBwdBlockK % kTileRows == 0);
static_assert(kFwdBlockK % (kTileVecs * W) == 0 && kBwdBlockK % (kTileVecs * W) == 0);

constexpr int64_t kDecodeMinKeysPerTask = 256;  // splitting the keys below this does not pay
// Decode bytes of k and v per thread below which the step runs on the calling thread alone:
// 256 KiB take ~10 us from DRAM, a few times a fork-join's cost on a quiet machine; on a busy one
// every parallel region also waits for its slowest thread to be scheduled, so the short caches of
// a decode's first tokens are cheaper on one thread (bench/RESULTS.md, "steady under load").
constexpr int64_t kDecodeMinBytesPerThread = 256 * 1024;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// C[ROWS x VECS*W] (+)= A[ROWS x depth] B[depth x VECS*W], the accumulators in registers.
// A(i, p) is a[i * a_row + p * a_col]; B and C are row-major with leading dims ldb, ldc.
template <int ROWS, int VECS, bool ACCUMULATE>
inline void gemm_tile(int64_t depth, const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb,
                      float* c, int64_t ldc) {
  fVec acc[ROWS][VECS];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v] = ACCUMULATE ? fVec::loadu(c + r * ldc + v * W) : fVec(0.f);
  for (int64_t p = 0; p < depth; ++p) {
    fVec b_row[VECS];
    for (int v = 0; v < VECS; ++v) b_row[v] = fVec::loadu(b + p * ldb + v * W);
    for (int r = 0; r < ROWS; ++r) {
      const fVec a_elem(a[r * a_row + p * a_col]);
      for (int v = 0; v < VECS; ++v) acc[r][v] = at::vec::fmadd(a_elem, b_row[v], acc[r][v]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < VECS; ++v) acc[r][v].store(c + r * ldc + v * W);
}

// C[rows x cols] (+)= A[rows x depth] B[depth x cols]; rows a multiple of kTileRows, cols of W.
template <bool ACCUMULATE>
void gemm(int64_t rows, int64_t cols, int64_t depth, const float* a, int64_t a_row, int64_t a_col, const float* b,
          int64_t ldb, float* c, int64_t ldc) {
  for (int64_t i = 0; i < rows; i += kTileRows) {
    const float* a_i = a + i * a_row;
    float* c_i = c + i * ldc;
    int64_t j = 0;
    for (; j + kTileVecs * W <= cols; j += kTileVecs * W)
      gemm_tile<kTileRows, kTileVecs, ACCUMULATE>(depth, a_i, a_row, a_col, b + j, ldb, c_i + j, ldc);
    switch ((cols - j) / W) {
      case 0:
        break;
      case 1:
        gemm_tile<kTileRows, 1, ACCUMULATE>(depth, a_i, a_row, a_col, b + j, ldb, c_i + j, ldc);
        break;
      case 2:
        gemm_tile<kTileRows, 2, ACCUMULATE>(depth, a_i, a_row, a_col, b + j, ldb, c_i + j, ldc);
        break;
      default:
        gemm_tile<kTileRows, 3, ACCUMULATE>(depth, a_i, a_row, a_col, b + j, ldb, c_i + j, ldc);
        break;
    }
  }
}

// A (B, H, T, D) tensor whose last dim is contiguous.
template <typename T>
struct Heads {
  T* data;
  int64_t stride_b, stride_h, stride_t;

  explicit Heads(const at::Tensor& t)
      : data(static_cast<T*>(t.data_ptr())), stride_b(t.stride(0)), stride_h(t.stride(1)), stride_t(t.stride(2)) {}
  T* row(int64_t b, int64_t h, int64_t t) const { return data + b * stride_b + h * stride_h + t * stride_t; }
};

// dst (rows x padded_d, fp32) = src rows [0, valid_rows) (D wide, row stride src_stride); zeros elsewhere.
template <typename scalar_t>
void pack_rows(const scalar_t* src, int64_t src_stride, int64_t valid_rows, int64_t rows, int64_t D, int64_t padded_d,
               float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    float* out = dst + r * padded_d;
    if (r >= valid_rows) {
      std::fill(out, out + padded_d, 0.f);
      continue;
    }
    for (int64_t d = 0; d < padded_d; d += W) load_float(src + r * src_stride + d, std::min(W, D - d)).store(out + d);
  }
}

// dst (D x rows, fp32) = the transpose of src rows [0, valid_rows); zeros in the other columns.
template <typename scalar_t>
void pack_transposed(const scalar_t* src, int64_t src_stride, int64_t valid_rows, int64_t rows, int64_t D, float* dst) {
  for (int64_t r = 0; r < valid_rows; ++r)
    for (int64_t d = 0; d < D; ++d) dst[d * rows + r] = static_cast<float>(src[r * src_stride + d]);
  for (int64_t d = 0; d < D; ++d) std::fill(dst + d * rows + valid_rows, dst + (d + 1) * rows, 0.f);
}

// Number of the `block` keys starting at key0 that query i sees.
int64_t visible_keys(int64_t i, int64_t offset, int64_t key0, int64_t block) {
  return std::clamp<int64_t>(i + offset - key0 + 1, 0, block);
}

// One row of the online softmax. scores[0, visible) are q.k dot products (unscaled);
// they become P = exp(scale * s - m') and the rest of the row, up to width, becomes 0.
// Updates the running max m and sum l, and returns exp(m - m') to rescale the output.
// The first key block a row sees holds key 0, so m' is finite from then on.
float online_softmax_row(float* scores, int64_t visible, int64_t width, float scale, float& m, float& l) {
  const fVec vscale(scale);
  fVec vmax(kNegInf);
  for (int64_t j = 0; j < visible; j += W) {
    const int64_t n = std::min(W, visible - j);
    const fVec s = fVec::loadu(scores + j, n) * vscale;
    vmax = at::vec::maximum(vmax, n == W ? s : fVec::set(fVec(kNegInf), s, n));
  }
  const float m_new = std::max(m, reduce_max(vmax));
  const fVec vm_new(m_new);
  fVec vsum(0.f);
  for (int64_t j = 0; j < width; j += W) {
    const int64_t n = std::clamp<int64_t>(visible - j, 0, W);
    fVec p = (at::vec::fmsub(fVec::loadu(scores + j), vscale, vm_new)).exp_u20();
    if (n < W) p = fVec::set(fVec(0.f), p, n);
    p.store(scores + j);
    vsum = vsum + p;
  }
  const float alpha = std::exp(m - m_new);
  l = l * alpha + reduce_sum(vsum);
  m = m_new;
  return alpha;
}

template <typename scalar_t>
void attention_fwd_tiled(const Heads<const scalar_t>& q, const Heads<const scalar_t>& k, const Heads<const scalar_t>& v,
                         const Heads<scalar_t>& out, float* lse, int64_t B, int64_t H, int64_t Tq, int64_t Tk,
                         int64_t D, float scale) {
  const int64_t offset = Tk - Tq;
  const int64_t padded_d = round_up(D, W);
  const int64_t block_q = std::min(kBlockQ, round_up(Tq, kTileRows));
  const int64_t q_blocks = ceil_div(Tq, block_q);
  // A task packs k and v of its head once and runs every `chunks`-th query block of the
  // head (interleaved, so that the causal work is balanced). Heads are split into chunks
  // only when there are too few of them to keep every thread busy.
  const int64_t chunks = std::clamp<int64_t>(ceil_div(2 * at::get_num_threads(), B * H), 1, q_blocks);
  at::parallel_for(0, B * H * chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t padded_tk = round_up(Tk, kKeyPanel);
    std::vector<float> kt_head(D * padded_tk), v_head(padded_tk * padded_d), q_blk(block_q * padded_d),
        scores(block_q * kFwdBlockK), acc(block_q * padded_d), row_max(block_q), row_sum(block_q);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / chunks / H, h = task / chunks % H, chunk = task % chunks;
      for (int64_t k0 = 0; k0 < padded_tk; k0 += kKeyPanel)
        pack_transposed(k.row(b, h, k0), k.stride_t, std::min(kKeyPanel, Tk - k0), kKeyPanel, D,
                        kt_head.data() + k0 * D);
      pack_rows(v.row(b, h, 0), v.stride_t, Tk, padded_tk, D, padded_d, v_head.data());
      for (int64_t q0 = chunk * block_q; q0 < Tq; q0 += chunks * block_q) {
        const int64_t nq = std::min(block_q, Tq - q0);
        pack_rows(q.row(b, h, q0), q.stride_t, nq, block_q, D, padded_d, q_blk.data());
        std::fill(row_max.begin(), row_max.end(), kNegInf);
        std::fill(row_sum.begin(), row_sum.end(), 0.f);
        std::fill(acc.begin(), acc.end(), 0.f);
        const int64_t key_end = q0 + nq + offset;  // the keys the block's last query sees
        for (int64_t k0 = 0; k0 < key_end; k0 += kFwdBlockK) {
          // the block's keys, up to the panel that holds the last one its last query sees
          const int64_t width = std::min(kFwdBlockK, round_up(key_end - k0, kKeyPanel));
          for (int64_t panel = k0; panel < k0 + width; panel += kKeyPanel)
            gemm<false>(block_q, kKeyPanel, D, q_blk.data(), padded_d, 1, kt_head.data() + panel * D, kKeyPanel,
                        scores.data() + panel - k0, kFwdBlockK);
          for (int64_t i = 0; i < block_q; ++i) {
            const float alpha =
                online_softmax_row(scores.data() + i * kFwdBlockK, visible_keys(q0 + i, offset, k0, width), width,
                                   scale, row_max[i], row_sum[i]);
            float* acc_i = acc.data() + i * padded_d;
            if (alpha != 1.f)
              for (int64_t d = 0; d < padded_d; d += W) (fVec::loadu(acc_i + d) * fVec(alpha)).store(acc_i + d);
          }
          gemm<true>(block_q, padded_d, width, scores.data(), kFwdBlockK, 1, v_head.data() + k0 * padded_d, padded_d,
                     acc.data(), padded_d);
        }
        for (int64_t i = 0; i < nq; ++i) {
          const fVec inv_sum(1.f / row_sum[i]);
          scalar_t* out_i = out.row(b, h, q0 + i);
          for (int64_t d = 0; d < D; d += W)
            store_float(fVec::loadu(acc.data() + i * padded_d + d) * inv_sum, out_i + d, std::min(W, D - d));
          lse[(b * H + h) * Tq + q0 + i] = row_max[i] + std::log(row_sum[i]);
        }
      }
    }
  });
}

// acc[d0, d0 + VECS * W) = sum_j p_j v_j[d0, ...) over nk value rows, the sums in registers.
template <int VECS, typename scalar_t>
void weighted_sum_of_rows(const float* p, const scalar_t* values, int64_t v_stride, int64_t nk, int64_t D, int64_t d0,
                          float* acc) {
  fVec sums[VECS];
  for (int u = 0; u < VECS; ++u) sums[u] = fVec(0.f);
  for (int64_t j = 0; j < nk; ++j) {
    const fVec p_j(p[j]);
    const scalar_t* v_j = values + j * v_stride + d0;
    for (int u = 0; u < VECS; ++u)
      sums[u] = at::vec::fmadd(p_j, load_float(v_j + u * W, std::min(W, D - d0 - u * W)), sums[u]);
  }
  for (int u = 0; u < VECS; ++u) sums[u].store(acc + d0 + u * W);
}

struct MaxAndSum {
  float max;  // max_j s_j
  float sum;  // sum_j exp(s_j - max)
};

// One query row q_row (fp32, padded) against nk keys and values (row strides k_stride,
// v_stride): scores s_j = scale q.k_j, then acc = sum_j exp(s_j - max) v_j (padded_d wide).
// `scores` has room for nk rounded up to W.
template <typename scalar_t>
MaxAndSum attend_one_query(const float* q_row, const scalar_t* keys, int64_t k_stride, const scalar_t* values,
                           int64_t v_stride, int64_t nk, int64_t D, float scale, float* scores, float* acc) {
  constexpr int64_t kKeysInFlight = 4;  // independent dot products, to hide the FMA latency
  fVec vmax(kNegInf);
  for (int64_t j = 0; j < nk; j += kKeysInFlight) {
    const int64_t n = std::min(kKeysInFlight, nk - j);
    fVec dots[kKeysInFlight];
    for (auto& dot : dots) dot = fVec(0.f);
    for (int64_t d = 0; d < D; d += W) {
      const fVec q_d = fVec::loadu(q_row + d);
      const int64_t width = std::min(W, D - d);
      for (int64_t u = 0; u < n; ++u)
        dots[u] = at::vec::fmadd(q_d, load_float(keys + (j + u) * k_stride + d, width), dots[u]);
    }
    for (int64_t u = 0; u < n; ++u) scores[j + u] = scale * reduce_sum(dots[u]);
  }
  for (int64_t j = 0; j < nk; j += W) {
    const int64_t n = std::min(W, nk - j);
    vmax = at::vec::maximum(vmax, fVec::set(fVec(kNegInf), fVec::loadu(scores + j, n), n));
  }
  const float m = reduce_max(vmax);
  fVec vsum(0.f);
  for (int64_t j = 0; j < nk; j += W) {
    const int64_t n = std::min(W, nk - j);
    const fVec p = fVec::set(fVec(0.f), (fVec::loadu(scores + j, n) - fVec(m)).exp_u20(), n);
    p.store(scores + j, n);
    vsum = vsum + p;
  }
  for (int64_t d0 = 0; d0 < D; d0 += kTileVecs * W) {
    switch (std::min<int64_t>(kTileVecs, ceil_div(D - d0, W))) {
      case 1:
        weighted_sum_of_rows<1>(scores, values, v_stride, nk, D, d0, acc);
        break;
      case 2:
        weighted_sum_of_rows<2>(scores, values, v_stride, nk, D, d0, acc);
        break;
      case 3:
        weighted_sum_of_rows<3>(scores, values, v_stride, nk, D, d0, acc);
        break;
      default:
        weighted_sum_of_rows<kTileVecs>(scores, values, v_stride, nk, D, d0, acc);
        break;
    }
  }
  return {m, reduce_sum(vsum)};
}

// Tq == 1: a row of Tk scores per head. With fewer heads than threads the keys are split
// into ranges (flash decoding), whose partial results are merged by their max and sum.
template <typename scalar_t>
void attention_fwd_decode(const Heads<const scalar_t>& q, const Heads<const scalar_t>& k,
                          const Heads<const scalar_t>& v, const Heads<scalar_t>& out, float* lse, int64_t B, int64_t H,
                          int64_t Tk, int64_t D, float scale) {
  const int64_t padded_d = round_up(D, W);
  const int64_t heads = B * H;
  const int64_t splits =
      std::clamp<int64_t>(ceil_div(at::get_num_threads(), heads), 1, std::max<int64_t>(1, Tk / kDecodeMinKeysPerTask));
  const int64_t keys_per_split = ceil_div(Tk, splits);
  // Per (head, split): the partial max, sum and unnormalised output.
  std::vector<MaxAndSum> partial(heads * splits);
  std::vector<float> partial_acc(heads * splits * padded_d, 0.f);
  auto attend = [&](int64_t begin, int64_t end) {
    std::vector<float> q_row(padded_d), scores(round_up(keys_per_split, W));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / splits / H, h = task / splits % H;
      const int64_t key0 = task % splits * keys_per_split, nk = std::min(keys_per_split, Tk - key0);
      if (nk <= 0) {
        partial[task] = {kNegInf, 0.f};  // an empty key range: weight 0 in the merge
        continue;
      }
      pack_rows(q.row(b, h, 0), 0, 1, 1, D, padded_d, q_row.data());
      partial[task] = attend_one_query(q_row.data(), k.row(b, h, key0), k.stride_t, v.row(b, h, key0), v.stride_t, nk,
                                       D, scale, scores.data(), partial_acc.data() + task * padded_d);
    }
  };
  const int64_t tasks = heads * splits;
  const int64_t cache_bytes = 2 * heads * Tk * D * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t threads_worth = cache_bytes / kDecodeMinBytesPerThread;
  if (threads_worth < 2) {
    attend(0, tasks);
  } else {
    at::parallel_for(0, tasks, ceil_div(tasks, threads_worth), attend);
  }
  std::vector<float> acc(padded_d);
  for (int64_t head = 0; head < heads; ++head) {
    const MaxAndSum* parts = partial.data() + head * splits;
    float m = kNegInf;
    for (int64_t s = 0; s < splits; ++s) m = std::max(m, parts[s].max);
    float sum = 0.f;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t s = 0; s < splits; ++s) {
      const float weight = std::exp(parts[s].max - m);
      sum += weight * parts[s].sum;
      const float* part = partial_acc.data() + (head * splits + s) * padded_d;
      for (int64_t d = 0; d < padded_d; d += W)
        at::vec::fmadd(fVec(weight), fVec::loadu(part + d), fVec::loadu(acc.data() + d)).store(acc.data() + d);
    }
    scalar_t* out_row = out.row(head / H, head % H, 0);
    for (int64_t d = 0; d < D; d += W)
      store_float(fVec::loadu(acc.data() + d) * fVec(1.f / sum), out_row + d, std::min(W, D - d));
    lse[head] = m + std::log(sum);
  }
}

template <typename scalar_t>
void attention_bwd_tiled(const Heads<const scalar_t>& grad_out, const Heads<const scalar_t>& q,
                         const Heads<const scalar_t>& k, const Heads<const scalar_t>& v,
                         const Heads<const scalar_t>& out, const float* lse, const Heads<scalar_t>& dq,
                         const Heads<scalar_t>& dk, const Heads<scalar_t>& dv, int64_t B, int64_t H, int64_t Tq,
                         int64_t Tk, int64_t D, float scale) {
  const int64_t offset = Tk - Tq;
  const int64_t padded_d = round_up(D, W);
  const int64_t block_q = std::min(kBlockQ, round_up(Tq, kTileRows));
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    // dq += dS k adds a whole block of rows, padded ones too (with dS = 0): dq_acc has room
    // for every row of the last block.
    std::vector<float> delta(Tq), dq_acc(round_up(Tq, block_q) * padded_d), kt_blk(D * kBwdBlockK),
        k_blk(kBwdBlockK * padded_d), vt_blk(D * kBwdBlockK), dk_acc(kBwdBlockK * padded_d),
        dv_acc(kBwdBlockK * padded_d), q_blk(block_q * padded_d), dout_blk(block_q * padded_d),
        p_blk(block_q * kBwdBlockK), ds_blk(block_q * kBwdBlockK);
    for (int64_t head = begin; head < end; ++head) {
      const int64_t b = head / H, h = head % H;
      const float* lse_bh = lse + head * Tq;
      for (int64_t i = 0; i < Tq; ++i) {
        fVec dot(0.f);
        for (int64_t d = 0; d < D; d += W) {
          const int64_t n = std::min(W, D - d);
          dot = at::vec::fmadd(load_float(grad_out.row(b, h, i) + d, n), load_float(out.row(b, h, i) + d, n), dot);
        }
        delta[i] = reduce_sum(dot);
      }
      std::fill(dq_acc.begin(), dq_acc.end(), 0.f);
      for (int64_t k0 = 0; k0 < Tk; k0 += kBwdBlockK) {
        const int64_t nk = std::min(kBwdBlockK, Tk - k0);
        pack_transposed(k.row(b, h, k0), k.stride_t, nk, kBwdBlockK, D, kt_blk.data());
        pack_rows(k.row(b, h, k0), k.stride_t, nk, kBwdBlockK, D, padded_d, k_blk.data());
        pack_transposed(v.row(b, h, k0), v.stride_t, nk, kBwdBlockK, D, vt_blk.data());
        std::fill(dk_acc.begin(), dk_acc.end(), 0.f);
        std::fill(dv_acc.begin(), dv_acc.end(), 0.f);
        const int64_t first_query = std::max<int64_t>(0, k0 - offset);  // the first query that sees key k0
        for (int64_t q0 = first_query / block_q * block_q; q0 < Tq; q0 += block_q) {
          const int64_t nq = std::min(block_q, Tq - q0);
          pack_rows(q.row(b, h, q0), q.stride_t, nq, block_q, D, padded_d, q_blk.data());
          pack_rows(grad_out.row(b, h, q0), grad_out.stride_t, nq, block_q, D, padded_d, dout_blk.data());
          gemm<false>(block_q, kBwdBlockK, D, q_blk.data(), padded_d, 1, kt_blk.data(), kBwdBlockK, p_blk.data(),
                      kBwdBlockK);
          gemm<false>(block_q, kBwdBlockK, D, dout_blk.data(), padded_d, 1, vt_blk.data(), kBwdBlockK, ds_blk.data(),
                      kBwdBlockK);
          for (int64_t i = 0; i < block_q; ++i) {
            // Padded query rows see nothing: their P and dS rows are 0.
            const int64_t visible = i < nq ? visible_keys(q0 + i, offset, k0, kBwdBlockK) : 0;
            const fVec vscale(scale), vlse(i < nq ? lse_bh[q0 + i] : 0.f), vdelta(i < nq ? delta[q0 + i] : 0.f);
            float* p_i = p_blk.data() + i * kBwdBlockK;
            float* ds_i = ds_blk.data() + i * kBwdBlockK;
            for (int64_t j = 0; j < kBwdBlockK; j += W) {
              const int64_t n = std::clamp<int64_t>(visible - j, 0, W);
              fVec p = at::vec::fmsub(fVec::loadu(p_i + j), vscale, vlse).exp_u20();
              if (n < W) p = fVec::set(fVec(0.f), p, n);
              p.store(p_i + j);
              (p * (fVec::loadu(ds_i + j) - vdelta)).store(ds_i + j);
            }
          }
          // dv += P^T dout, dk += dS^T q (scaled at the end), dq += dS k (scaled at the end)
          gemm<true>(kBwdBlockK, padded_d, block_q, p_blk.data(), 1, kBwdBlockK, dout_blk.data(), padded_d,
                     dv_acc.data(), padded_d);
          gemm<true>(kBwdBlockK, padded_d, block_q, ds_blk.data(), 1, kBwdBlockK, q_blk.data(), padded_d, dk_acc.data(),
                     padded_d);
          gemm<true>(block_q, padded_d, kBwdBlockK, ds_blk.data(), kBwdBlockK, 1, k_blk.data(), padded_d,
                     dq_acc.data() + q0 * padded_d, padded_d);
        }
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t d = 0; d < D; d += W) {
            const int64_t n = std::min(W, D - d);
            store_float(fVec::loadu(dk_acc.data() + j * padded_d + d) * fVec(scale), dk.row(b, h, k0 + j) + d, n);
            store_float(fVec::loadu(dv_acc.data() + j * padded_d + d), dv.row(b, h, k0 + j) + d, n);
          }
      }
      for (int64_t i = 0; i < Tq; ++i)
        for (int64_t d = 0; d < D; d += W)
          store_float(fVec::loadu(dq_acc.data() + i * padded_d + d) * fVec(scale), dq.row(b, h, i) + d,
                      std::min(W, D - d));
    }
  });
}

// The kernels read the last dim with vector loads: it must have stride 1.
at::Tensor last_dim_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

void check_heads(const char* op, const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  TORCH_CHECK(t.dim() == 4, op, ": ", name, " must be (B, H, T, D), got shape ", t.sizes());
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", name,
              " must be float32 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), op, ": ", name, " must have q's dtype ", like.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.size(0) == like.size(0) && t.size(1) == like.size(1) && t.size(3) == like.size(3), op, ": ", name,
              " must have q's B, H and D ", like.sizes(), ", got ", t.sizes());
}

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_heads(op, "q", q, q);
  check_heads(op, "k", k, q);
  check_heads(op, "v", v, q);
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(k.size(2) >= q.size(2), op, ": k must have at least as many positions (", k.size(2), ") as q (",
              q.size(2), ")");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> causal_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                        const at::Tensor& v_in, double scale) {
  check_qkv("causal_attention_fwd", q_in, k_in, v_in);
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in);
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(q.scalar_type(), "causal_attention_fwd", [&] {
    const Heads<const scalar_t> qh(q), kh(k), vh(v);
    const Heads<scalar_t> outh(out);
    if (Tq == 1)
      attention_fwd_decode(qh, kh, vh, outh, lse.data_ptr<float>(), B, H, Tk, D, static_cast<float>(scale));
    else
      attention_fwd_tiled(qh, kh, vh, outh, lse.data_ptr<float>(), B, H, Tq, Tk, D, static_cast<float>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> causal_attention_bwd(const at::Tensor& grad_out_in,
                                                                    const at::Tensor& q_in, const at::Tensor& k_in,
                                                                    const at::Tensor& v_in, const at::Tensor& out_in,
                                                                    const at::Tensor& lse_in, double scale) {
  constexpr const char* op = "causal_attention_bwd";
  check_qkv(op, q_in, k_in, v_in);
  check_heads(op, "grad_out", grad_out_in, q_in);
  check_heads(op, "out", out_in, q_in);
  TORCH_CHECK(grad_out_in.sizes() == q_in.sizes() && out_in.sizes() == q_in.sizes(), op,
              ": grad_out and out must have q's shape ", q_in.sizes(), ", got ", grad_out_in.sizes(), " and ",
              out_in.sizes());
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.sizes() == q_in.sizes().slice(0, 3), op,
              ": lse must be float32 of shape (B, H, Tq) = ", q_in.sizes().slice(0, 3), ", got ", lse_in.scalar_type(),
              " ", lse_in.sizes());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in), v = last_dim_contiguous(v_in),
                   grad_out = last_dim_contiguous(grad_out_in), out = last_dim_contiguous(out_in),
                   lse = lse_in.contiguous();
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), Tk = k.size(2), D = q.size(3);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  if (q.numel() == 0 || dk.numel() == 0) {  // no query, or no element: nothing sees the keys
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(q.scalar_type(), op, [&] {
    attention_bwd_tiled(Heads<const scalar_t>(grad_out), Heads<const scalar_t>(q), Heads<const scalar_t>(k),
                        Heads<const scalar_t>(v), Heads<const scalar_t>(out), lse.data_ptr<float>(),
                        Heads<scalar_t>(dq), Heads<scalar_t>(dk), Heads<scalar_t>(dv), B, H, Tq, Tk, D,
                        static_cast<float>(scale));
  });
  return {dq, dk, dv};
}

}  // namespace pyminigpt::cpu::CPU_CAPABILITY
