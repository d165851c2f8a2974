// Native tests of the pyminigpt operators (run by ctest, see CMakeLists.txt).
//
//   pyminigpt_test_ops path/to/libpyminigpt_C.so
//
// Loads the library the way torch.ops.load_library does, then calls each registered op
// through the dispatcher on random CPU inputs and compares it with ATen (the backward ops
// with autograd through the ATen reference). Which CPU kernel variant runs follows
// ATEN_CPU_CAPABILITY (default, avx2, avx512); exit code 77 means this CPU cannot run the
// requested one (ctest reports the test as skipped), any other non-zero code a failure.
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/autograd.h>

#include <dlfcn.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

using at::Tensor;
using Tensors3 = std::tuple<Tensor, Tensor, Tensor>;
using at::indexing::Slice;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// The typed handle of pyminigpt::<name>; Sig is the C++ signature of its schema.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const std::string& name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(("pyminigpt::" + name).c_str(), "").typed<Sig>();
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::runtime_error(what);
}

void check_close(const Tensor& actual, const Tensor& expected, const std::string& what, double rtol = 1e-4,
                 double atol = 1e-5) {
  std::ostringstream msg;
  msg << what << ": ";
  if (actual.sizes() != expected.sizes()) {
    msg << "shape " << actual.sizes() << ", expected " << expected.sizes();
    throw std::runtime_error(msg.str());
  }
  if (!at::allclose(actual.to(at::kFloat), expected.to(at::kFloat), rtol, atol)) {
    msg << "max abs difference " << (actual.to(at::kFloat) - expected.to(at::kFloat)).abs().max().item<float>()
        << " (rtol " << rtol << ", atol " << atol << ")";
    throw std::runtime_error(msg.str());
  }
}

// Gradients of outputs wrt inputs for the upstream gradient grad, by autograd.
std::vector<Tensor> grads(const Tensor& output, const std::vector<Tensor>& inputs, const Tensor& grad) {
  return torch::autograd::grad({output}, inputs, {grad});
}

Tensor with_grad(const Tensor& t) { return t.detach().clone().requires_grad_(true); }

// --- softmax ---------------------------------------------------------------------------

void test_softmax_fwd() {
  const double T = 0.7;
  const Tensor x = at::randn({33, 67}) * 3;
  const Tensor y = op<Tensor(const Tensor&, double)>("softmax_fwd").call(x, T);
  check_close(y, at::softmax(x / T, -1), "softmax_fwd y");
}

void test_softmax_bwd() {
  const double T = 0.7;
  const Tensor x = with_grad(at::randn({33, 67}) * 3);
  const Tensor y = at::softmax(x / T, -1);
  const Tensor dy = at::randn_like(y);
  const Tensor dx = op<Tensor(const Tensor&, const Tensor&, double)>("softmax_bwd").call(y.detach(), dy, T);
  check_close(dx, grads(y, {x}, dy)[0], "softmax_bwd dx");
}

// --- layer norm --------------------------------------------------------------------------

void test_layer_norm_fwd() {
  const double eps = 1e-5;
  const int64_t C = 83;
  const Tensor x = at::randn({29, C}) * 2 + 1, w = at::randn({C}), b = at::randn({C});
  auto [y, mean, rstd] =
      op<Tensors3(const Tensor&, const Tensor&, const Tensor&, double)>("layer_norm_fwd").call(x, w, b, eps);
  auto [y_ref, mean_ref, rstd_ref] = at::native_layer_norm(x, {C}, w, b, eps);
  check_close(y, y_ref, "layer_norm_fwd y");
  check_close(mean, mean_ref.flatten(), "layer_norm_fwd mean");
  check_close(rstd, rstd_ref.flatten(), "layer_norm_fwd rstd");
}

void test_layer_norm_bwd() {
  const double eps = 1e-5;
  const int64_t C = 83;
  const Tensor x = with_grad(at::randn({29, C}) * 2 + 1), w = with_grad(at::randn({C})), b = with_grad(at::randn({C}));
  const Tensor y = at::layer_norm(x, {C}, w, b, eps);
  const Tensor dy = at::randn_like(y);
  const std::vector<Tensor> ref = grads(y, {x, w, b}, dy);
  auto [_, mean, rstd] = at::native_layer_norm(x.detach(), {C}, w.detach(), b.detach(), eps);
  auto [dx, dw, db] =
      op<Tensors3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&)>("layer_norm_bwd")
          .call(dy, x.detach(), w.detach(), mean.flatten(), rstd.flatten());
  check_close(dx, ref[0], "layer_norm_bwd dx");
  check_close(dw, ref[1], "layer_norm_bwd dweight");
  check_close(db, ref[2], "layer_norm_bwd dbias");
}

// --- sampling ----------------------------------------------------------------------------

// transformers' TopKLogitsWarper then TopPLogitsWarper (k = 0 / p = 1 disable them).
Tensor filter_reference(const Tensor& logits, int64_t top_k, double top_p, int64_t min_keep) {
  Tensor out = logits.clone();
  if (top_k > 0) {
    const int64_t k = std::min(std::max(top_k, min_keep), logits.size(-1));
    const Tensor kth = std::get<0>(out.topk(k, -1)).index({Slice(), Slice(-1)});
    out = out.masked_fill(out < kth, -kInf);
  }
  if (top_p < 1) {
    auto [sorted, order] = out.sort(-1, /*descending=*/false);
    Tensor remove = sorted.softmax(-1).cumsum(-1) <= (1 - top_p);
    remove.index_put_({Slice(), Slice(-min_keep)}, false);
    out = out.masked_fill(remove.scatter(1, order, remove), -kInf);
  }
  return out;
}

auto filter_op() { return op<Tensor(const Tensor&, int64_t, double, int64_t)>("top_k_top_p_filter"); }

void test_top_k_top_p_filter() {
  const Tensor logits = at::randn({8, 1000}) * 2;
  // top_k alone: the kept set is the k largest.
  const Tensor topk = filter_op().call(logits, 10, 1.0, 1);
  const Tensor kept = topk > -kInf;
  check((kept.sum(-1) == 10).all().item<bool>(), "top_k_top_p_filter: top_k=10 must keep 10 tokens per row");
  const Tensor largest = at::zeros_like(kept).scatter(1, std::get<1>(logits.topk(10, -1)), true);
  check(at::equal(kept, largest), "top_k_top_p_filter: top_k=10 must keep the 10 largest logits");
  check(at::equal(topk.masked_select(kept), logits.masked_select(kept)), "top_k_top_p_filter: kept logits changed");
  // Against transformers' warpers, top-p alone and after top-k, with min_tokens_to_keep.
  const std::vector<std::tuple<int64_t, double, int64_t>> cases = {
      {0, 0.9, 1}, {50, 0.8, 1}, {0, 0.01, 5}, {0, 1.0, 1}};
  for (const auto& [top_k, top_p, min_keep] : cases) {
    const Tensor y = filter_op().call(logits, top_k, top_p, min_keep);
    std::ostringstream what;
    what << "top_k_top_p_filter(top_k=" << top_k << ", top_p=" << top_p << ", min_tokens_to_keep=" << min_keep << ")";
    check(at::equal(y, filter_reference(logits, top_k, top_p, min_keep)), what.str() + " differs from transformers'");
  }
}

void test_sample() {
  const auto sample = op<Tensor(const Tensor&, double, int64_t, double, const Tensor&)>("sample");
  const Tensor logits = at::randn({16, 1000}) * 2;
  const Tensor u = at::rand({16});
  for (const auto& [T, top_k, top_p] :
       std::vector<std::tuple<double, int64_t, double>>{{1.0, 0, 1.0}, {0.8, 50, 0.9}}) {
    const Tensor token = sample.call(logits, T, top_k, top_p, u);
    check(token.scalar_type() == at::kLong && token.sizes() == at::IntArrayRef{16}, "sample: expected (16,) int64");
    // The draw: the first kept index whose cumulative kept probability exceeds u * total.
    const Tensor filtered = filter_reference(logits / T, top_k, top_p, 1);
    check(filtered.gather(1, token.unsqueeze(1)).gt(-kInf).all().item<bool>(), "sample: drew a token not kept");
    const Tensor cum = filtered.softmax(-1).cumsum(-1);
    const Tensor expected = (cum <= u.unsqueeze(1) * cum.index({Slice(), Slice(-1)})).sum(-1);
    check(at::equal(token, expected), "sample: token differs from the inverse-CDF draw over the kept set");
  }
  check(at::equal(sample.call(logits, 1.0, 1, 1.0, u), logits.argmax(-1)), "sample: top_k=1 must give the argmax");
}

// --- causal attention --------------------------------------------------------------------

// softmax(q k^T * scale) v where query i sees keys j <= i + Tk - Tq; also the log-sum-exp.
std::pair<Tensor, Tensor> attention_reference(const Tensor& q, const Tensor& k, const Tensor& v, double scale) {
  const int64_t Tq = q.size(2), Tk = k.size(2);
  const Tensor visible = at::arange(Tk).unsqueeze(0) <= at::arange(Tq).unsqueeze(1) + (Tk - Tq);
  const Tensor scores = at::matmul(q, k.transpose(-2, -1)).mul(scale).masked_fill(visible.logical_not(), -kInf);
  return {at::matmul(scores.softmax(-1), v), scores.logsumexp(-1)};
}

auto attention_fwd() {
  return op<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&, double)>("causal_attention_fwd");
}

void test_causal_attention_fwd() {
  const Tensor q = at::randn({2, 3, 37, 64}), k = at::randn({2, 3, 37, 64}), v = at::randn({2, 3, 37, 64});
  const double scale = 1 / std::sqrt(64.0);
  auto [out, lse] = attention_fwd().call(q, k, v, scale);
  check_close(out, at::scaled_dot_product_attention(q, k, v, {}, 0.0, /*is_causal=*/true, scale), "attention out");
  check_close(lse, attention_reference(q, k, v, scale).second, "attention lse");
  // Fewer queries than keys (decoding), k and v slices of a larger cache (strided sequence dim).
  const Tensor q2 = at::randn({2, 3, 5, 64}), cache_k = at::randn({2, 3, 48, 64}), cache_v = at::randn({2, 3, 48, 64});
  const Tensor k2 = cache_k.index({Slice(), Slice(), Slice(0, 37)}),
               v2 = cache_v.index({Slice(), Slice(), Slice(0, 37)});
  auto [out2, lse2] = attention_fwd().call(q2, k2, v2, 0.3);
  auto [out2_ref, lse2_ref] = attention_reference(q2, k2, v2, 0.3);
  check_close(out2, out2_ref, "attention out (Tq=5 < Tk=37, strided k/v)");
  check_close(lse2, lse2_ref, "attention lse (Tq=5 < Tk=37, strided k/v)");
}

void test_causal_attention_bwd() {
  const Tensor q = with_grad(at::randn({2, 3, 37, 64})), k = with_grad(at::randn({2, 3, 37, 64})),
               v = with_grad(at::randn({2, 3, 37, 64}));
  const double scale = 1 / std::sqrt(64.0);
  const Tensor out_ref = attention_reference(q, k, v, scale).first;
  const Tensor dout = at::randn_like(out_ref);
  const std::vector<Tensor> ref = grads(out_ref, {q, k, v}, dout);
  auto [out, lse] = attention_fwd().call(q.detach(), k.detach(), v.detach(), scale);
  auto [dq, dk, dv] =
      op<Tensors3(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, double)>(
          "causal_attention_bwd")
          .call(dout, q.detach(), k.detach(), v.detach(), out, lse, scale);
  check_close(dq, ref[0], "attention_bwd dq");
  check_close(dk, ref[1], "attention_bwd dk");
  check_close(dv, ref[2], "attention_bwd dv");
}

// --- linear ------------------------------------------------------------------------------

void test_linear() {
  const auto linear = op<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&)>("linear");
  // rows 1 to 8 run on the kernel, more on ATen's GEMM; K = 769 leaves a partial vector
  for (const int64_t rows : {1, 2, 3, 8, 9}) {
    const Tensor x = at::randn({rows, 769}), w = at::randn({50, 769}) / 28, b = at::randn({50});
    check_close(linear.call(x, w, b), at::linear(x, w, b), "linear y (" + std::to_string(rows) + " rows)");
    check_close(linear.call(x, w, std::nullopt), at::linear(x, w), "linear y without bias");
    const Tensor xb = x.to(at::kBFloat16), wb = w.to(at::kBFloat16), bb = b.to(at::kBFloat16);
    check_close(linear.call(xb, wb, bb), at::linear(xb.to(at::kFloat), wb.to(at::kFloat), bb.to(at::kFloat)),
                "linear y bf16 (" + std::to_string(rows) + " rows)", 2e-2, 2e-2);
    // the weight stored transposed (K, N) and passed as a view, as GPT-2's Conv1D holds it
    const Tensor wt = w.t().contiguous();
    check_close(linear.call(x, wt.t(), b), at::linear(x, w, b), "linear y, transposed weight");
    const Tensor wtb = wt.to(at::kBFloat16);
    check_close(linear.call(xb, wtb.t(), bb), at::linear(xb.to(at::kFloat), wb.to(at::kFloat), bb.to(at::kFloat)),
                "linear y bf16, transposed weight", 2e-2, 2e-2);
  }
}

// ATEN_CPU_CAPABILITY forces a variant without asking the CPU: refuse one it cannot run.
bool cpu_can_run_requested_capability() {
  const char* requested = std::getenv("ATEN_CPU_CAPABILITY");
  if (requested == nullptr) return true;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (std::strcmp(requested, "avx2") == 0)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (std::strcmp(requested, "avx512") == 0)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#endif
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " path/to/libpyminigpt_C.so\n";
    return 2;
  }
  if (!cpu_can_run_requested_capability()) {
    std::cout << "skipped: this CPU cannot run ATEN_CPU_CAPABILITY=" << std::getenv("ATEN_CPU_CAPABILITY") << "\n";
    return 77;
  }
  // RTLD_LAZY: the Python C API that PyInit__C calls stays unresolved, as no interpreter runs
  // here (torch.ops.load_library runs inside one); loading registers the ops.
  if (dlopen(argv[1], RTLD_LAZY | RTLD_LOCAL) == nullptr) {
    std::cerr << "cannot load " << argv[1] << ": " << dlerror() << "\n";
    return 1;
  }
  std::cout << "CPU capability: " << at::get_cpu_capability() << "\n";

  const std::vector<std::pair<const char*, std::function<void()>>> tests = {
      {"softmax_fwd", test_softmax_fwd},
      {"softmax_bwd", test_softmax_bwd},
      {"layer_norm_fwd", test_layer_norm_fwd},
      {"layer_norm_bwd", test_layer_norm_bwd},
      {"top_k_top_p_filter", test_top_k_top_p_filter},
      {"sample", test_sample},
      {"causal_attention_fwd", test_causal_attention_fwd},
      {"causal_attention_bwd", test_causal_attention_bwd},
      {"linear", test_linear},
  };
  int failures = 0;
  for (const auto& [name, test] : tests) {
    at::manual_seed(0);
    try {
      test();
      std::cout << "ok    " << name << "\n";
    } catch (const c10::Error& e) {  // the op refused its inputs
      std::cout << "FAIL  " << name << ": " << e.what_without_backtrace() << "\n";
      ++failures;
    } catch (const std::exception& e) {  // a failed check
      std::cout << "FAIL  " << name << ": " << e.what() << "\n";
      ++failures;
    }
  }
  std::cout << (failures ? std::to_string(failures) + " of " : "all ") << tests.size() << " ops "
            << (failures ? "failed" : "passed") << "\n";
  return failures ? 1 : 0;
}
