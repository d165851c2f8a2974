// transformers' top-k and top-p warpers (top_k_top_p_filter) and a draw from what they
// keep (sample), without sorting the vocabulary.
//
// Per row of V logits x (NaN counts as -inf), with probabilities softmax(x / T):
//   top-k: kth = the k-th largest x, k = max(top_k, min_tokens_to_keep); keep x >= kth
//          (ties at the k-th value stay); top_k = 0 or >= V disables it.
//   top-p: order the top-k survivors ascending by (x, index) -- a stable sort -- and remove
//          the longest prefix whose probability mass is <= (1 - top_p) * total mass, but
//          keep at least min_tokens_to_keep tokens; top_p = 1 disables it.
// Each kept set is "(x_i, i) >= a threshold pair (value, index)" in lexicographic order,
// which is how the kernel carries it (struct Threshold). Then
//   filter: y_i = x_i if kept, else -inf;
//   sample: the first kept index, in vocabulary order, whose cumulative kept mass
//           exceeds u * (total kept mass), for the row's uniform u in [0, 1).
//
// How, in O(V) per row:
//   * k-th largest: a pool seeded with the first values, then one vectorized scan that
//     pushes only the values above a running threshold; when the pool fills up,
//     nth_element shrinks it to the k largest and raises the threshold (for k << V
//     almost nothing passes).
//   * top-p over few survivors (small k or small V): gather them, sort them, walk.
//   * top-p over many survivors: histogram their masses over 2048 buckets of logit, find
//     the bucket in which the ascending cumulative mass crosses (1 - top_p) * total, and
//     sort only the tokens of that bucket.
// Probability masses are exp((x - max) / T) accumulated in double; the threshold can
// differ from transformers' fp32 cumsum only where that cumsum is within ~1e-6 of 1 - top_p.
//
// Memory traffic per row: the logits are read from memory once and then re-read from
// cache (a 50257-wide fp32 row is 196 KiB, it stays in L2) 2-4 times; the filter writes
// V logits, sample writes one int64. Rows are split across threads with at::parallel_for.
// Storage is float or bfloat16 (a bf16 row is first widened into a per-thread fp32 row).
#include "kernels.h"
#include "vec_utils.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

namespace pyminigpt::cpu::CPU_CAPABILITY {
namespace {

constexpr int64_t W = fVec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Top-p sorts the survivors directly when there are at most this many of them.
constexpr int64_t kSortLimit = 512;
// Top-p histogram: kBuckets buckets of equal width over kBucketRange of (max - x) / T;
// everything lower (masses below exp(-40) of the largest) shares the last bucket.
constexpr int64_t kBuckets = 2048;
constexpr float kBucketRange = 40.f;

struct Token {
  float value;
  int64_t index;
  bool operator<(const Token& other) const {
    return value < other.value || (value == other.value && index < other.index);
  }
};

// Kept: (x_i, i) >= (value, index), i.e. x_i > value, or x_i == value and i >= index.
// NaN compares false, so it is never kept.
struct Threshold {
  float value;
  int64_t index;
  bool keeps(float x, int64_t i) const { return x > value || (x == value && i >= index); }
};

// The lanes of x[i, i + W) that t keeps, as a Vectorized mask (all bits set where kept).
fVec kept_lanes(const fVec& x, int64_t i, const Threshold& t) {
  const fVec value(t.value);
  if (i >= t.index) return x >= value;
  if (i + W <= t.index) return x > value;
  return fVec::set(x >= value, x > value, t.index - i);  // lanes before t.index need x > value
}

// Per-thread scratch, allocated once per parallel task.
struct Workspace {
  std::vector<float> row;          // a bf16 row widened to fp32
  std::vector<float> pool;         // k-th largest: the values above the running threshold
  std::vector<Token> survivors;    // top-k survivors, in vocabulary order
  std::vector<Token> ascending;    // survivors (or one histogram bucket), sorted ascending
  std::vector<uint16_t> bucket;    // top-p histogram: each token's bucket (kBuckets = not a survivor)
  std::vector<float> mass;         // sample: each token's kept mass
  std::vector<float> block_mass;   // sample: the mass of each group of W tokens
};

// Calls visit(i), in increasing i, for every x[i] > bound (x[i] >= bound when kInclusive).
// The vector compare skips W tokens at a time; visit may raise bound.
template <bool kInclusive, typename Visit>
void for_each_above(const float* x, int64_t n, const float& bound, Visit&& visit) {
  const auto passes = [&](float v) { return kInclusive ? v >= bound : v > bound; };
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const fVec v = fVec::loadu(x + i), b(bound);
    const fVec hit = kInclusive ? v >= b : v > b;
    // zero_mask: a bit per lane that compared false (0.f); the others are all-ones.
    for (uint64_t lanes = ~static_cast<uint64_t>(hit.zero_mask()) & ((uint64_t{1} << W) - 1); lanes;
         lanes &= lanes - 1) {
      const int64_t j = i + __builtin_ctzll(lanes);
      if (passes(x[j])) visit(j);  // re-checked: an earlier visit may have raised bound
    }
  }
  for (; i < n; ++i) {
    if (passes(x[i])) visit(i);
  }
}

// The largest x, ignoring NaN; -inf when there is none.
float row_max(const float* x, int64_t n) {
  fVec lanes(kNegInf);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const fVec v = fVec::loadu(x + i);
    lanes = at::vec::maximum(lanes, fVec::blendv(fVec(kNegInf), v, v == v));
  }
  float m = reduce_max(lanes);
  for (; i < n; ++i) m = std::max(m, x[i]);  // std::max(m, NaN) keeps m
  return m;
}

// The k-th largest of x (1 <= k <= n), NaN counting as -inf.
//
// The pool starts as the first `capacity` values (copied in bulk, NaN -> -inf), cut down to
// their k largest: bound = the k-th of them, a lower bound of the answer. The scan of the
// rest pushes only values above bound (about k / i of them at token i for a random row);
// each time the pool fills up, nth_element cuts it back to k and raises bound. A small
// capacity keeps bound close behind the answer, so fewer values are pushed than with a
// large pool filled one push at a time (the timings of both are in bench/RESULTS.md).
float kth_largest(const float* x, int64_t n, int64_t k, std::vector<float>& pool) {
  const auto greater = std::greater<float>();
  const int64_t capacity = std::max<int64_t>(4 * k, 256);
  const int64_t seeded = std::min(capacity, n);
  pool.resize(seeded);
  for (int64_t i = 0; i < seeded; ++i) pool[i] = x[i] == x[i] ? x[i] : kNegInf;
  // every value not in the pool is <= bound (or NaN), and k values >= bound are in it
  float bound = kNegInf;
  const auto shrink = [&] {
    std::nth_element(pool.begin(), pool.begin() + (k - 1), pool.end(), greater);
    bound = pool[k - 1];
    pool.resize(k);
  };
  shrink();  // seeded >= k, as k <= n
  for_each_above<false>(x + seeded, n - seeded, bound, [&](int64_t i) {
    pool.push_back(x[seeded + i]);
    if (static_cast<int64_t>(pool.size()) == capacity) shrink();
  });
  std::nth_element(pool.begin(), pool.begin() + (k - 1), pool.end(), greater);
  return pool[k - 1];
}

// The m-th largest (x_i, i) in lexicographic order (1 <= m <= n), NaN counting as -inf.
Threshold mth_largest_token(const float* x, int64_t n, int64_t m, std::vector<float>& pool) {
  const float value = kth_largest(x, n, m, pool);
  int64_t above = 0;
  for_each_above<false>(x, n, value, [&](int64_t) { ++above; });
  // Of the tokens equal to value, the largest indices come first in descending order.
  for (int64_t i = n - 1, needed = m - above; i >= 0; --i) {
    if (x[i] == value && --needed == 0) return {value, i};
  }
  return {value, 0};  // fewer than m tokens at all: value is -inf, and NaN counts as -inf
}

// Top-p over survivors sorted ascending by (x, i), with masses exp((x - max) * inv_t).
Threshold top_p_sorted(const std::vector<Token>& ascending, double top_p, int64_t min_keep, float inv_t) {
  const int64_t count = static_cast<int64_t>(ascending.size());
  const double max = ascending.back().value;
  const auto mass = [&](const Token& t) { return std::exp((t.value - max) * inv_t); };
  double total = 0;
  for (const Token& t : ascending) total += mass(t);
  const double removable = (1.0 - top_p) * total;
  int64_t first_kept = count - 1;
  double cumulative = 0;
  for (int64_t j = 0; j < count; ++j) {
    cumulative += mass(ascending[j]);
    if (cumulative > removable) {
      first_kept = j;
      break;
    }
  }
  first_kept = std::min(first_kept, std::max<int64_t>(count - min_keep, 0));
  return {ascending[first_kept].value, ascending[first_kept].index};
}

// Top-p over every x_i >= kth (the top-k survivors) of a long row, through a histogram.
Threshold top_p_histogram(const float* x, int64_t n, float kth, float max, double top_p, int64_t min_keep, float inv_t,
                          Workspace& ws) {
  double bucket_mass[kBuckets] = {};
  int64_t bucket_count[kBuckets] = {};
  ws.bucket.resize(n);
  // bucket = floor((max - x) / T * kBuckets / kBucketRange): monotone in x, ties share one
  const float scale = inv_t * (kBuckets / kBucketRange);
  const fVec vmax(max), vinv_t(inv_t), vscale(scale);
  float offsets[W], masses[W];
  for (int64_t i = 0; i < n; i += W) {
    const int64_t lanes = std::min(W, n - i);
    const fVec v = fVec::loadu(x + i, lanes);
    ((vmax - v) * vscale).store(offsets);
    ((v - vmax) * vinv_t).exp().store(masses);
    for (int64_t l = 0; l < lanes; ++l) {
      if (!(x[i + l] >= kth)) {
        ws.bucket[i + l] = kBuckets;
        continue;
      }
      const int64_t b = offsets[l] < kBuckets - 1 ? static_cast<int64_t>(offsets[l]) : kBuckets - 1;
      ws.bucket[i + l] = static_cast<uint16_t>(b);
      bucket_mass[b] += masses[l];
      ++bucket_count[b];
    }
  }
  double total = 0;
  for (double m : bucket_mass) total += m;
  const double removable = (1.0 - top_p) * total;
  // Walk the buckets from the lowest logits up to the one where the mass crosses `removable`.
  double cumulative = 0;
  int64_t crossing = kBuckets - 1;
  for (; crossing >= 0 && cumulative + bucket_mass[crossing] <= removable; --crossing) {
    cumulative += bucket_mass[crossing];
  }
  if (crossing < 0 || bucket_count[crossing] == 0) {  // only rounding (or an infinite logit) gets here
    return mth_largest_token(x, n, min_keep, ws.pool);
  }
  ws.ascending.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (ws.bucket[i] == crossing) ws.ascending.push_back({x[i], i});
  }
  std::sort(ws.ascending.begin(), ws.ascending.end());
  // The crossing is inside this bucket; if rounding hides it, keep the bucket's largest.
  int64_t first_kept = static_cast<int64_t>(ws.ascending.size()) - 1;
  for (int64_t j = 0; j <= first_kept; ++j) {
    cumulative += std::exp((ws.ascending[j].value - static_cast<double>(max)) * inv_t);
    if (cumulative > removable) {
      first_kept = j;
      break;
    }
  }
  int64_t kept = static_cast<int64_t>(ws.ascending.size()) - first_kept;
  for (int64_t b = 0; b < crossing; ++b) kept += bucket_count[b];
  if (kept < min_keep) return mth_largest_token(x, n, min_keep, ws.pool);
  return {ws.ascending[first_kept].value, ws.ascending[first_kept].index};
}

struct Filter {
  int64_t top_k;
  double top_p;
  int64_t min_keep;
  float inv_t;  // 1 / temperature: top-p masses are exp((x - max) * inv_t)
};

// The kept set of a row whose max (NaN ignored) is finite. When it returns true in
// `gathered`, ws.survivors holds every kept token and more, in vocabulary order.
Threshold select_kept(const float* x, int64_t n, float max, const Filter& f, Workspace& ws, bool& gathered) {
  const bool top_k = f.top_k > 0 && f.top_k < n;
  const int64_t k = top_k ? std::min(std::max(f.top_k, f.min_keep), n) : n;
  const float kth = top_k ? kth_largest(x, n, k, ws.pool) : kNegInf;
  gathered = false;
  if (k <= kSortLimit) {
    ws.survivors.clear();
    for_each_above<true>(x, n, kth, [&](int64_t i) { ws.survivors.push_back({x[i], i}); });
    gathered = static_cast<int64_t>(ws.survivors.size()) <= kSortLimit;  // unless there are many ties
  }
  if (f.top_p >= 1.0) return {kth, 0};
  if (!gathered) return top_p_histogram(x, n, kth, max, f.top_p, f.min_keep, f.inv_t, ws);
  ws.ascending.assign(ws.survivors.begin(), ws.survivors.end());
  std::sort(ws.ascending.begin(), ws.ascending.end());
  return top_p_sorted(ws.ascending, f.top_p, f.min_keep, f.inv_t);
}

// The row as fp32: the tensor's own memory for float, ws.row for bfloat16.
template <typename scalar_t>
const float* fp32_row(const scalar_t* x, int64_t n, Workspace& ws) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return x;
  } else {
    ws.row.resize(n);
    for (int64_t i = 0; i < n; i += W)
      load_float(x + i, std::min(W, n - i)).store(ws.row.data() + i, std::min(W, n - i));
    return ws.row.data();
  }
}

template <typename scalar_t>
void filter_rows(const scalar_t* logits, scalar_t* out, int64_t rows, int64_t n, const Filter& f) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    Workspace ws;
    for (int64_t r = begin; r < end; ++r) {
      const float* x = fp32_row(logits + r * n, n, ws);
      const float max = row_max(x, n);
      bool gathered;
      // A row without a finite logit keeps nothing but -inf (and NaN becomes -inf).
      const Threshold t = max > kNegInf ? select_kept(x, n, max, f, ws, gathered) : Threshold{kNegInf, 0};
      scalar_t* y = out + r * n;
      for (int64_t i = 0; i < n; i += W) {
        const int64_t lanes = std::min(W, n - i);
        const fVec v = fVec::loadu(x + i, lanes);
        store_float(fVec::blendv(fVec(kNegInf), v, kept_lanes(v, i, t)), y + i, lanes);
      }
    }
  });
}

// The draw from survivors gathered in vocabulary order (few of them): masses in double.
int64_t draw_from_survivors(const std::vector<Token>& survivors, const Threshold& t, float max, float inv_t, double u) {
  const auto mass = [&](const Token& s) {
    return t.keeps(s.value, s.index) ? std::exp((s.value - double(max)) * inv_t) : 0.0;
  };
  double total = 0;
  for (const Token& s : survivors) total += mass(s);
  const double target = u * total;
  double cumulative = 0;
  int64_t last = 0;
  for (const Token& s : survivors) {
    const double m = mass(s);
    if (m > 0) {
      cumulative += m;
      last = s.index;
      if (cumulative > target) return s.index;
    }
  }
  return last;  // only a row without mass (or rounding at u -> 1) gets here
}

// The draw over a whole row: the masses of each group of W tokens are summed first, then
// the walk skips whole groups until the one where the cumulative mass crosses u * total.
int64_t draw_from_row(const float* x, int64_t n, const Threshold& t, float max, float inv_t, double u, Workspace& ws) {
  const int64_t groups = (n + W - 1) / W;
  ws.mass.resize(groups * W);
  ws.block_mass.resize(groups);
  const fVec vmax(max), vinv_t(inv_t), zero(0.f);
  double total = 0;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t i = g * W, lanes = std::min(W, n - i);
    const fVec v = fVec::loadu(x + i, lanes);
    fVec m = fVec::blendv(zero, ((v - vmax) * vinv_t).exp(), kept_lanes(v, i, t));
    if (lanes < W) m = fVec::set(zero, m, lanes);
    m.store(ws.mass.data() + i);
    ws.block_mass[g] = reduce_sum(m);
    total += ws.block_mass[g];
  }
  const double target = u * total;
  double cumulative = 0;
  for (int64_t g = 0; g < groups; ++g) {
    if (cumulative + ws.block_mass[g] > target) {
      int64_t last = g * W;
      for (int64_t i = g * W; i < std::min(n, (g + 1) * W); ++i) {
        if (ws.mass[i] > 0) {
          cumulative += ws.mass[i];
          last = i;
          if (cumulative > target) return i;
        }
      }
      return last;  // the crossing was lost to rounding inside the group
    }
    cumulative += ws.block_mass[g];
  }
  for (int64_t i = n - 1; i >= 0; --i) {  // rounding at u -> 1: the last token with mass
    if (ws.mass[i] > 0) return i;
  }
  return 0;
}

template <typename scalar_t>
void sample_rows(const scalar_t* logits, const float* uniform, int64_t* tokens, int64_t rows, int64_t n,
                 const Filter& f) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    Workspace ws;
    for (int64_t r = begin; r < end; ++r) {
      const float* x = fp32_row(logits + r * n, n, ws);
      const float max = row_max(x, n);
      if (!(max > kNegInf)) {  // no finite logit: nothing to draw
        tokens[r] = 0;
        continue;
      }
      bool gathered;
      const Threshold t = select_kept(x, n, max, f, ws, gathered);
      tokens[r] = gathered ? draw_from_survivors(ws.survivors, t, max, f.inv_t, uniform[r])
                           : draw_from_row(x, n, t, max, f.inv_t, uniform[r], ws);
    }
  });
}

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": logits must be a CPU tensor, got ", logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16, op,
              ": logits must be float32 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, op, ": logits must be (batch, vocab) with vocab > 0, got ",
              logits.sizes());
  TORCH_CHECK(logits.size(1) <= std::numeric_limits<int32_t>::max(), op, ": vocab too large, got ", logits.size(1));
}

void check_filter(int64_t top_k, double top_p, const char* op) {
  TORCH_CHECK(top_k >= 0, op, ": top_k must be >= 0 (0 disables it), got ", top_k);
  TORCH_CHECK(top_p > 0 && top_p <= 1, op, ": top_p must be in (0, 1] (1 disables it), got ", top_p);
}

}  // namespace

at::Tensor top_k_top_p_filter(const at::Tensor& logits, int64_t top_k, double top_p, int64_t min_tokens_to_keep) {
  check_logits(logits, "top_k_top_p_filter");
  check_filter(top_k, top_p, "top_k_top_p_filter");
  TORCH_CHECK(min_tokens_to_keep >= 1, "top_k_top_p_filter: min_tokens_to_keep must be >= 1, got ", min_tokens_to_keep);
  const at::Tensor x = logits.contiguous();
  at::Tensor out = at::empty_like(x);
  const Filter f{top_k, top_p, min_tokens_to_keep, 1.f};
  PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(x.scalar_type(), "top_k_top_p_filter", [&] {
    filter_rows(x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.size(0), x.size(1), f);
  });
  return out;
}

at::Tensor sample(const at::Tensor& logits, double temperature, int64_t top_k, double top_p,
                  const at::Tensor& uniform) {
  check_logits(logits, "sample");
  check_filter(top_k, top_p, "sample");
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "sample: temperature must be a finite number > 0, got ",
              temperature);
  TORCH_CHECK(uniform.device().is_cpu() && uniform.scalar_type() == at::kFloat && uniform.dim() == 1 &&
                  uniform.size(0) == logits.size(0),
              "sample: uniform must be a float32 CPU tensor of shape (", logits.size(0), ",), got ",
              uniform.scalar_type(), " ", uniform.sizes(), " on ", uniform.device());
  const at::Tensor x = logits.contiguous(), u = uniform.contiguous();
  at::Tensor tokens = at::empty({x.size(0)}, x.options().dtype(at::kLong));
  const Filter f{top_k, top_p, 1, static_cast<float>(1.0 / temperature)};
  PYMINIGPT_DISPATCH_FLOAT_AND_BFLOAT16(x.scalar_type(), "sample", [&] {
    sample_rows(x.const_data_ptr<scalar_t>(), u.const_data_ptr<float>(), tokens.mutable_data_ptr<int64_t>(), x.size(0),
                x.size(1), f);
  });
  return tokens;
}

}  // namespace pyminigpt::cpu::CPU_CAPABILITY
