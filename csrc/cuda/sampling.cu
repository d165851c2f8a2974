// Top-k / top-p filtering and fused sampling, without sorting the vocabulary.
//
// transformers' warpers define the kept set through a sort; here it is found by *radix
// selection*: the row's logits are mapped to 32-bit keys whose unsigned order is the
// float order, and the cut is located one 8-bit digit at a time, most significant first,
// from a 256-bin histogram of the keys still in play. Four passes pin a value exactly;
// a sort would move the whole row through memory log(V) times instead.
//
//   top-k (k_eff = max(top_k, min_tokens_to_keep)): select the k_eff-th largest key by
//     *count*; keep every logit >= it (ties at the k-th value stay).
//   top-p: with mass(x) = exp((x - max) / T) over the logits top-k kept, select by *mass*
//     the first key, in descending order, at which the cumulative mass reaches
//     top_p * total. transformers sorts ascending and stably, so among equal logits the
//     lower indices go first: the kept set is a prefix of the order (value desc, index
//     desc). When the cut falls inside a run of equal logits, a second radix selection
//     over their indices finds how far the prefix reaches. min_tokens_to_keep extends
//     the prefix by count the same way.
//   sample: total = kept mass, target = uniform * total; the token is the first index, in
//     vocabulary order, whose inclusive prefix sum of kept mass exceeds the target (a
//     block-wide scan over the row, stopping at the tile that crosses the target).
//
// One 1024-thread block per row. Every pass reads the row (16-byte loads where the row
// is aligned); the selections read it 4 to 8 times, mostly from L1/L2, and after the
// first digit only a few keys still match the prefix. Memory traffic from DRAM: about
// one read of the logits (plus, for the filter, one write). Histograms are kept per lane
// ([bin][lane], padded) so the 32 lanes of a warp never add to the same word: logits
// crowd into a few bins, and same-word shared atomics within a warp would serialise.
#include <cub/block/block_scan.cuh>

#include <type_traits>

#include "common.cuh"

namespace pyminigpt::cuda {
namespace {

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kBins = 256;
constexpr int kLaneStride = 33;  // [bin][lane] histogram row; column 32 gets the bin's total
constexpr int kDrawItems = 4;    // consecutive elements per thread in a tile of the draw

// Monotone map float -> uint32: a < b as floats iff key(a) < key(b) as integers. NaN
// counts as -inf and -0.0 as +0.0 (they compare equal as floats, so they must tie here).
__device__ __forceinline__ uint32_t ordered_key(float x) {
  if (x != x) x = -INFINITY;
  if (x == 0.f) x = 0.f;
  const uint32_t bits = __float_as_uint(x);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// The float a key stands for (the inverse of ordered_key on non-NaN values).
__device__ __forceinline__ float key_to_float(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

__device__ __forceinline__ float nan_to_neg_inf(float x) { return x != x ? -INFINITY : x; }

// Calls visit(index, value) for every element of the row, value converted to fp32.
template <typename T, typename Visit>
__device__ __forceinline__ void for_each_logit(const T* row, int64_t vocab, Visit&& visit) {
  for_each_pack<true>(row, vocab, threadIdx.x, kThreads, [&](int64_t i, auto pack) {
#pragma unroll
    for (int e = 0; e < pack_size<decltype(pack)>; ++e) visit(i + e, to_float(pack.v[e]));
  });
}

// The kept set is {i : key_i > key, or key_i == key and i >= min_index}.
struct Cut {
  uint32_t key;
  int64_t min_index;
};

__device__ __forceinline__ bool is_kept(const Cut& cut, uint32_t key, int64_t i) {
  return key > cut.key || (key == cut.key && i >= cut.min_index);
}

// Shared memory of one block (dynamic: about 68 KB).
struct Scratch {
  int count[kBins * kLaneStride];
  float mass[kBins * kLaneStride];
  // The chosen bin of the last selection pass, written by warp 0.
  uint32_t bin;
  int above_count;   // keys in play above the chosen bin (all passes so far)
  float above_mass;  // their mass (mass selections)
  int bin_count;     // keys in the chosen bin
  float target;  // a relative target, scaled by the first pass's total mass
  float reduce[kWarps];
};

struct Selection {
  uint32_t key;       // the selected key
  int above_count;    // keys in play strictly above it
  float above_mass;   // their mass (mass selections only)
  int tie_count;      // keys in play equal to it
  float target;       // the target, scaled to absolute mass when it was relative
};

template <bool kMass>
using Weight = std::conditional_t<kMass, float, int>;

// Warp 0: given the histogram, choose the bin (descending order) where the cumulative
// weight first reaches `target`; if none does (the target exceeds what is in play, or
// float rounding), the lowest non-empty bin, which keeps everything in play.
template <bool kMass>
__device__ void choose_bin(Scratch& s, Weight<kMass> target, bool relative, Weight<kMass> above_w, int above_c) {
  const int lane = threadIdx.x;
  const int top = kBins - 1 - 8 * lane;  // lane owns bins top, top-1, ..., top-7
  int c[8];
  Weight<kMass> w[8];
  int lane_c = 0;
  Weight<kMass> lane_w = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    c[j] = s.count[(top - j) * kLaneStride + 32];
    if constexpr (kMass) {
      w[j] = s.mass[(top - j) * kLaneStride + 32];
    } else {
      w[j] = c[j];
    }
    lane_c += c[j];
    lane_w += w[j];
  }
  // Inclusive scans over lanes: lane 0 holds the highest bins.
  int incl_c = lane_c;
  Weight<kMass> incl_w = lane_w;
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int up_c = __shfl_up_sync(0xffffffffu, incl_c, offset);
    const Weight<kMass> up_w = __shfl_up_sync(0xffffffffu, incl_w, offset);
    if (lane >= offset) {
      incl_c += up_c;
      incl_w += up_w;
    }
  }
  if (relative) target = target * __shfl_sync(0xffffffffu, incl_w, 31);
  int run_c = above_c + incl_c - lane_c;
  Weight<kMass> run_w = above_w + incl_w - lane_w;
  int found = -1, last = -1, found_c = 0, last_c = 0;
  Weight<kMass> found_w = 0, last_w = 0;
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    if (c[j] > 0) {
      if (found < 0 && run_w + w[j] >= target) {
        found = j;
        found_c = run_c;
        found_w = run_w;
      }
      last = j;
      last_c = run_c;
      last_w = run_w;
    }
    run_c += c[j];
    run_w += w[j];
  }
  const unsigned found_lanes = __ballot_sync(0xffffffffu, found >= 0);
  const unsigned nonempty_lanes = __ballot_sync(0xffffffffu, last >= 0);
  const int src = found_lanes ? __ffs(found_lanes) - 1 : 31 - __clz(nonempty_lanes);
  if (lane == src) {
    const int j = found_lanes ? found : last;
    s.bin = static_cast<uint32_t>(top - j);
    s.above_count = found_lanes ? found_c : last_c;
    s.above_mass = static_cast<float>(found_lanes ? found_w : last_w);
    // Unrolled select: c stays in registers (a run-time index would put it in local memory).
#pragma unroll
    for (int k = 0; k < 8; ++k)
      if (k == j) s.bin_count = c[k];
    s.target = static_cast<float>(target);
  }
}

// Radix selection over the keys `in_play(i, x, &key, &mass)` accepts, digits from
// `first_shift` down to 0. kMass = false selects by count, kMass = true by mass; a
// relative target is a fraction of the total mass in play.
template <bool kMass, typename T, typename InPlay>
__device__ Selection radix_select(const T* row, int64_t vocab, int first_shift, Weight<kMass> target, bool relative,
                                  InPlay in_play, Scratch& s) {
  uint32_t prefix = 0, prefix_mask = 0;
  Weight<kMass> above_w = 0;
  int above_c = 0;
  const int lane = threadIdx.x % 32;
  for (int shift = first_shift; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < kBins * kLaneStride; b += kThreads) {
      s.count[b] = 0;
      if constexpr (kMass) s.mass[b] = 0.f;
    }
    __syncthreads();
    for_each_logit(row, vocab, [&](int64_t i, float x) {
      uint32_t key;
      float mass;
      if (!in_play(i, x, key, mass) || (key & prefix_mask) != prefix) return;
      const int slot = static_cast<int>((key >> shift) & (kBins - 1)) * kLaneStride + lane;
      atomicAdd(&s.count[slot], 1);
      if constexpr (kMass) atomicAdd(&s.mass[slot], mass);
    });
    __syncthreads();
    if (threadIdx.x < kBins) {  // merge the 32 lane columns of one bin into its column 32
      int* count_row = s.count + threadIdx.x * kLaneStride;
      int c = 0;
      for (int l = 0; l < 32; ++l) c += count_row[l];
      count_row[32] = c;
      if constexpr (kMass) {
        float* mass_row = s.mass + threadIdx.x * kLaneStride;
        float m = 0.f;
        for (int l = 0; l < 32; ++l) m += mass_row[l];
        mass_row[32] = m;
      }
    }
    __syncthreads();
    if (threadIdx.x < 32) choose_bin<kMass>(s, target, relative && shift == first_shift, above_w, above_c);
    __syncthreads();
    prefix |= s.bin << shift;
    prefix_mask |= static_cast<uint32_t>(kBins - 1) << shift;
    above_c = s.above_count;
    if constexpr (kMass) {
      above_w = s.above_mass;
      target = s.target;
    } else {
      above_w = above_c;  // by count, the weight above the prefix is its count
    }
  }
  Selection sel{prefix, above_c, static_cast<float>(above_w), s.bin_count, static_cast<float>(target)};
  __syncthreads();  // the next selection overwrites the scratch
  return sel;
}

// Highest 8-bit digit position that an index below `vocab` can use.
__host__ __device__ inline int index_first_shift(int64_t vocab) {
  int shift = 0;
  while (shift < 24 && ((vocab - 1) >> (shift + 8)) > 0) shift += 8;
  return shift;
}

// The cut that keeps the `keep` (>= 1) first keys of `sel`'s run of ties, taken from the
// highest index down: the keep-th largest index among them, by radix selection.
template <typename T>
__device__ Cut cut_in_ties(const T* row, int64_t vocab, const Selection& sel, int keep, Scratch& s) {
  if (keep >= sel.tie_count) return {sel.key, 0};
  const uint32_t tie_key = sel.key;
  const Selection index = radix_select<false>(
      row, vocab, index_first_shift(vocab), keep, false,
      [&](int64_t i, float x, uint32_t& key, float&) {
        key = static_cast<uint32_t>(i);
        return ordered_key(x) == tie_key;
      },
      s);
  return {tie_key, static_cast<int64_t>(index.key)};
}

// The k-th largest key among those >= floor, by count.
template <typename T>
__device__ Selection select_by_count(const T* row, int64_t vocab, uint32_t floor, int k, Scratch& s) {
  return radix_select<false>(
      row, vocab, 24, k, false,
      [&](int64_t, float x, uint32_t& key, float&) {
        key = ordered_key(x);
        return key >= floor;
      },
      s);
}

__device__ float block_reduce(float value, bool is_max, Scratch& s) {
  value = is_max ? warp_max(value) : warp_sum(value);
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) s.reduce[warp] = value;
  __syncthreads();
  float total = s.reduce[0];
  for (int w = 1; w < kWarps; ++w) total = is_max ? fmaxf(total, s.reduce[w]) : total + s.reduce[w];
  __syncthreads();
  return total;
}

// The cut that transformers' top-k then top-p (with min_tokens_to_keep) would make on
// row * inv_temperature, whose maximum is row_max.
template <typename T>
__device__ Cut find_cut(const T* row, int64_t vocab, int top_k, float top_p, int min_tokens_to_keep,
                        float inv_temperature, float row_max, Scratch& s) {
  uint32_t floor = 0;  // top-k: keep keys >= floor
  if (top_k > 0 && top_k < vocab) {
    const int k = top_k > min_tokens_to_keep ? top_k : min_tokens_to_keep;
    if (k < vocab) floor = select_by_count(row, vocab, 0u, k, s).key;  // ties at the k-th value stay
  }
  if (!(top_p < 1.f)) return {floor, 0};

  const Selection sel = radix_select<true>(
      row, vocab, 24, top_p, true,
      [&](int64_t, float x, uint32_t& key, float& mass) {
        key = ordered_key(x);
        mass = expf((nan_to_neg_inf(x) - row_max) * inv_temperature);
        return key >= floor;
      },
      s);
  // Ties of the selected key kept: the fewest whose mass reaches the target. One tie's
  // mass is computed exactly as the histogram computed it, not as the atomically summed
  // mass of the run divided by its count, which can be off by a rounding.
  const float tie_each = expf((key_to_float(sel.key) - row_max) * inv_temperature);
  int keep = sel.tie_count;
  if (tie_each > 0.f) {
    const float needed = ceilf((sel.target - sel.above_mass) / tie_each);
    if (needed < static_cast<float>(sel.tie_count)) keep = needed < 1.f ? 1 : static_cast<int>(needed);
  }
  if (sel.above_count + keep >= min_tokens_to_keep) return cut_in_ties(row, vocab, sel, keep, s);
  // min_tokens_to_keep reaches further: exactly that many first keys of the order (or
  // everything in play, if fewer).
  const Selection by_count = select_by_count(row, vocab, floor, min_tokens_to_keep, s);
  const int count_keep = min_tokens_to_keep - by_count.above_count;
  return cut_in_ties(row, vocab, by_count, count_keep < 1 ? 1 : count_keep, s);
}

template <typename T>
__global__ void
__launch_bounds__(kThreads) top_k_top_p_filter_kernel(const T* __restrict__ logits, T* __restrict__ out,
                                                                      int64_t vocab, int top_k, float top_p,
                                                                      int min_tokens_to_keep) {
  extern __shared__ __align__(16) unsigned char smem[];
  Scratch& s = *reinterpret_cast<Scratch*>(smem);
  const T* row = logits + int64_t{blockIdx.x} * vocab;
  T* out_row = out + int64_t{blockIdx.x} * vocab;

  float row_max = -INFINITY;
  for_each_logit(row, vocab, [&](int64_t, float x) { row_max = fmaxf(row_max, nan_to_neg_inf(x)); });
  row_max = block_reduce(row_max, true, s);
  // A row without a finite maximum keeps nothing but -inf: the cut is irrelevant.
  const Cut cut = row_max == -INFINITY ? Cut{0u, 0}
                                       : find_cut(row, vocab, top_k, top_p, min_tokens_to_keep, 1.f, row_max, s);
  for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
    const float x = to_float(row[i]);
    out_row[i] = is_kept(cut, ordered_key(x), i) && x == x ? row[i] : from_float<T>(-INFINITY);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(const T* __restrict__ logits, const float* __restrict__ uniform,
                                                          int64_t* __restrict__ tokens, int64_t vocab,
                                                          float inv_temperature, int top_k, float top_p) {
  using BlockScan = cub::BlockScan<float, kThreads>;
  extern __shared__ __align__(16) unsigned char smem[];
  Scratch& s = *reinterpret_cast<Scratch*>(smem);
  __shared__ typename BlockScan::TempStorage scan_storage;
  __shared__ unsigned long long chosen;         // first index past the target (or ~0)
  __shared__ unsigned long long last_with_mass;  // fallback: the last index with mass
  const T* row = logits + int64_t{blockIdx.x} * vocab;

  float row_max = -INFINITY;
  for_each_logit(row, vocab, [&](int64_t, float x) { row_max = fmaxf(row_max, nan_to_neg_inf(x)); });
  row_max = block_reduce(row_max, true, s);
  if (row_max == -INFINITY) {  // no finite logit: index 0 (the Python layer raises first)
    if (threadIdx.x == 0) tokens[blockIdx.x] = 0;
    return;
  }
  const Cut cut = find_cut(row, vocab, top_k, top_p, 1, inv_temperature, row_max, s);
  auto kept_mass = [&](int64_t i) {
    const float x = nan_to_neg_inf(to_float(row[i]));
    return is_kept(cut, ordered_key(x), i) ? expf((x - row_max) * inv_temperature) : 0.f;
  };

  float total = 0.f;
  for_each_logit(row, vocab, [&](int64_t i, float x) {
    x = nan_to_neg_inf(x);
    if (is_kept(cut, ordered_key(x), i)) total += expf((x - row_max) * inv_temperature);
  });
  total = block_reduce(total, false, s);
  const float target = uniform[blockIdx.x] * total;

  // Walk the row in tiles of kThreads * kDrawItems consecutive elements; `running` is the
  // kept mass before the tile. The first element whose inclusive sum exceeds the target
  // wins; if rounding leaves none, the last element with mass.
  if (threadIdx.x == 0) {
    chosen = ~0ull;
    last_with_mass = 0;
  }
  __syncthreads();
  float running = 0.f;
  int64_t my_last = -1;
  constexpr int64_t kTile = int64_t{kThreads} * kDrawItems;
  for (int64_t tile = 0; tile < vocab; tile += kTile) {
    const int64_t first = tile + int64_t{threadIdx.x} * kDrawItems;
    float mass[kDrawItems];
    float thread_sum = 0.f;
#pragma unroll
    for (int e = 0; e < kDrawItems; ++e) {
      mass[e] = first + e < vocab ? kept_mass(first + e) : 0.f;
      thread_sum += mass[e];
      if (mass[e] > 0.f) my_last = first + e;
    }
    float before, tile_sum;
    BlockScan(scan_storage).ExclusiveSum(thread_sum, before, tile_sum);
    float cumulative = running + before;
    bool crossed = false;
#pragma unroll
    for (int e = 0; e < kDrawItems; ++e) {
      cumulative += mass[e];
      if (!crossed && mass[e] > 0.f && cumulative > target) {
        atomicMin(&chosen, static_cast<unsigned long long>(first + e));
        crossed = true;
      }
    }
    running += tile_sum;
    // A barrier that also tells every thread whether any crossed: `chosen` is final, and
    // scan_storage may be reused by the next tile.
    if (__syncthreads_or(crossed)) break;
  }
  if (chosen == ~0ull) {  // rounding left the target uncrossed: the last token with mass
    if (my_last >= 0) atomicMax(&last_with_mass, static_cast<unsigned long long>(my_last));
    __syncthreads();
  }
  if (threadIdx.x == 0) tokens[blockIdx.x] = static_cast<int64_t>(chosen != ~0ull ? chosen : last_with_mass);
}

// One block per row, with the Scratch in dynamic shared memory.
template <typename... Params, typename... Args>
cudaError_t launch_per_row(void (*kernel)(Params...), int64_t n_rows, cudaStream_t stream, Args... args) {
  PYMINIGPT_CUDA_RETURN_IF_ERROR(allow_dynamic_smem(kernel, sizeof(Scratch)));
  kernel<<<static_cast<unsigned>(n_rows), kThreads, sizeof(Scratch), stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace

const char* sampling_unsupported(int64_t n_rows, int64_t vocab, int64_t top_k, float top_p,
                                 int64_t min_tokens_to_keep) {
  if (n_rows < 0 || vocab < 1) return "sampling: logits must have at least one column and a non-negative row count";
  if (n_rows > int64_t{INT32_MAX}) return "sampling: more than 2^31 - 1 rows";
  if (vocab > int64_t{INT32_MAX}) return "sampling: vocabulary larger than 2^31 - 1";
  if (top_k < 0) return "sampling: top_k must be >= 0";
  if (!(top_p > 0.f && top_p <= 1.f)) return "sampling: top_p must be in (0, 1]";
  if (min_tokens_to_keep < 1) return "sampling: min_tokens_to_keep must be >= 1";
  return nullptr;
}

cudaError_t top_k_top_p_filter(const void* logits, void* out, int64_t n_rows, int64_t vocab, int64_t top_k,
                               float top_p, int64_t min_tokens_to_keep, DType dtype, cudaStream_t stream) {
  if (sampling_unsupported(n_rows, vocab, top_k, top_p, min_tokens_to_keep) != nullptr) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  const int k = static_cast<int>(top_k < vocab ? top_k : vocab);
  const int min_keep = static_cast<int>(min_tokens_to_keep < vocab ? min_tokens_to_keep : vocab);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_per_row(top_k_top_p_filter_kernel<T>, n_rows, stream, static_cast<const T*>(logits),
                          static_cast<T*>(out), vocab, k, top_p, min_keep);
  });
}

cudaError_t sample(const void* logits, const float* uniform, int64_t* tokens, int64_t n_rows, int64_t vocab,
                   float temperature, int64_t top_k, float top_p, DType dtype, cudaStream_t stream) {
  if (sampling_unsupported(n_rows, vocab, top_k, top_p, 1) != nullptr) return cudaErrorInvalidValue;
  if (!(temperature > 0.f) || temperature == INFINITY) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  const int k = static_cast<int>(top_k < vocab ? top_k : vocab);
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return launch_per_row(sample_kernel<T>, n_rows, stream, static_cast<const T*>(logits), uniform, tokens, vocab,
                          1.f / temperature, k, top_p);
  });
}

}  // namespace pyminigpt::cuda
