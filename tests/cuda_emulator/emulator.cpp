// The emulator's runtime: fibers for a block's threads, the scheduler that releases
// barriers and warp instructions, cp.async queues, launch checks, and the few CUDA
// runtime functions the launchers call. See include/emulator.h for the model.
#include "emulator.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <csetjmp>
#include <csignal>
#include <cstdio>
#include <map>
#include <stdexcept>
#include <string>
#include <vector>

namespace emu {

uint3 block_idx;
dim3 block_dim;
dim3 grid_dim;

namespace {

constexpr size_t kStackBytes = 512 * 1024;
constexpr size_t kDefaultSmemLimit = 48 * 1024;
constexpr size_t kDeviceSmemLimit = 227 * 1024;  // H100 / H200, per block

enum class State { kReady, kAtWarpOp, kAtBarrier, kDone };

struct AsyncCopy {
  void* dst;
  const void* src;
  int bytes, src_bytes;
};

struct Thread {
  ucontext_t context;
  uint3 idx;
  State state = State::kReady;
  WarpOp* op = nullptr;
  const char* barrier = nullptr;
  int predicate = 0;
  std::vector<AsyncCopy> copies;
};

struct Block {
  std::vector<Thread> threads;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  int barrier_result = 0;
  std::string failure;  // set by fail(); the scheduler stops the launch
};

Block g_block;
Thread* g_current = nullptr;
std::vector<unsigned char*> g_stacks;
std::vector<std::pair<unsigned char*, size_t>> g_static_smem;  // every static_shared object so far
unsigned char* g_dynamic_smem = nullptr;  // next to g_smem_guard, an unmapped page
unsigned char* g_smem_mapping = nullptr;
unsigned char* g_smem_guard = nullptr;
size_t g_smem_mapped_bytes = 0;
std::map<const void*, int> g_max_dynamic_smem;
cudaError_t g_last_error = cudaSuccess;
std::string g_last_failure;
bool g_reverse_order = false;
bool g_guard_before = false;
int g_sm_count = 132;

size_t page_size() { return static_cast<size_t>(sysconf(_SC_PAGESIZE)); }

// `bytes` (a multiple of 16) of dynamic shared memory that end where an unmapped page
// begins or, with g_guard_before, begin where one ends.
void map_dynamic_smem(size_t bytes) {
  if (g_smem_mapping != nullptr) munmap(g_smem_mapping, g_smem_mapped_bytes);
  const size_t pages = (bytes + page_size() - 1) / page_size() * page_size();
  g_smem_mapped_bytes = pages + page_size();
  void* p = mmap(nullptr, g_smem_mapped_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("emulator: cannot map shared memory");
  g_smem_mapping = static_cast<unsigned char*>(p);
  g_smem_guard = g_guard_before ? g_smem_mapping : g_smem_mapping + pages;
  mprotect(g_smem_guard, page_size(), PROT_NONE);
  g_dynamic_smem = g_guard_before ? g_smem_guard + page_size() : g_smem_guard - bytes;
}

// ---- Out-of-bounds accesses ----------------------------------------------------------
// Dynamic shared memory ends at an unmapped page, and so do the buffers the tests allocate
// (test_emulated_kernels.py: guarded); with g_guard_before they start at one instead. An
// access past the end (or before the start) faults; the handler jumps back to run_block,
// which reports the thread and the address.

sigjmp_buf g_fault_return;
void* g_fault_address = nullptr;

void on_fault(int, siginfo_t* info, void*) {
  g_fault_address = info->si_addr;
  siglongjmp(g_fault_return, 1);
}

// Installs on_fault, on a stack of its own, for the lifetime of one launch.
class FaultHandler {
 public:
  FaultHandler() {
    static unsigned char alternate_stack[64 * 1024];
    stack_t stack{};
    stack.ss_sp = alternate_stack;
    stack.ss_size = sizeof alternate_stack;
    sigaltstack(&stack, &previous_stack_);
    struct sigaction action{};
    action.sa_sigaction = on_fault;
    action.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&action.sa_mask);
    sigaction(SIGSEGV, &action, &previous_action_);
  }
  ~FaultHandler() {
    sigaction(SIGSEGV, &previous_action_, nullptr);
    sigaltstack(&previous_stack_, nullptr);
  }

 private:
  struct sigaction previous_action_{};
  stack_t previous_stack_{};
};

// The stack of fiber i, with an unmapped page below it.
unsigned char* stack(size_t i) {
  while (g_stacks.size() <= i) {
    void* p = mmap(nullptr, kStackBytes + page_size(), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("emulator: cannot map a fiber stack");
    mprotect(p, page_size(), PROT_NONE);
    g_stacks.push_back(static_cast<unsigned char*>(p) + page_size());
  }
  return g_stacks[i];
}

void apply_copies(Thread& t) {
  for (const AsyncCopy& c : t.copies) {
    if (c.src_bytes > 0) std::memcpy(c.dst, c.src, c.src_bytes);
    std::memset(static_cast<unsigned char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
  }
  t.copies.clear();
}

void yield() { swapcontext(&g_current->context, &g_block.scheduler); }

void thread_main() {
  (*g_block.body)();
  apply_copies(*g_current);  // copies still in flight complete after the thread exits
  g_current->state = State::kDone;
}  // returns to the scheduler through uc_link

int linear_index(const uint3& i) { return static_cast<int>(i.x + block_dim.x * (i.y + block_dim.y * i.z)); }

std::string where(const Thread& t) {
  char text[96];
  const int linear = linear_index(t.idx);
  std::snprintf(text, sizeof text, "thread %d (warp %d, lane %d)", linear, linear / 32, linear % 32);
  return text;
}

std::string describe(const Thread& t) {
  switch (t.state) {
    case State::kReady:
      return where(t) + " ready";
    case State::kAtWarpOp:
      return where(t) + " at " + t.op->name;
    case State::kAtBarrier:
      return where(t) + " at " + t.barrier;
    case State::kDone:
      return where(t) + " exited";
  }
  return where(t);
}

// Releases the warp instructions of warp `first / 32` whose lanes have all arrived.
// Returns whether any was; throws when a lane of a waiting instruction has exited.
bool release_warp_ops(int first) {
  std::vector<Thread>& threads = g_block.threads;
  const int lanes_here = std::min(32, static_cast<int>(threads.size()) - first);
  bool released = false;
  for (int l = 0; l < lanes_here; ++l) {
    Thread& leader = threads[first + l];
    if (leader.state != State::kAtWarpOp) continue;
    const unsigned mask = leader.op->mask;
    if (!(mask >> l & 1u))
      throw std::runtime_error(where(leader) + ": " + leader.op->name + " with a mask that excludes the calling lane");
    WarpOp* ops[32] = {};
    bool complete = true;
    for (int m = 0; m < 32 && complete; ++m) {
      if (!(mask >> m & 1u)) continue;
      if (m >= lanes_here)
        throw std::runtime_error(where(leader) + ": " + leader.op->name + " names lane " + std::to_string(m) +
                                 ", which the block does not have");
      Thread& lane = threads[first + m];
      if (lane.state == State::kDone)
        throw std::runtime_error(where(leader) + " waits at " + leader.op->name + " for " + where(lane) +
                                 ", which exited");
      complete =
          lane.state == State::kAtWarpOp && lane.op->mask == mask && std::strcmp(lane.op->name, leader.op->name) == 0;
      ops[m] = lane.op;
    }
    if (!complete) continue;
    leader.op->resolve(ops, mask);
    if (!g_block.failure.empty())
      throw std::runtime_error(where(leader) + ", " + leader.op->name + ": " + g_block.failure);
    for (int m = 0; m < 32; ++m)
      if (mask >> m & 1u) threads[first + m].state = State::kReady;
    released = true;
  }
  return released;
}

// Runs the ready lanes of the warp starting at thread `first`, each up to its next
// synchronisation point. Returns whether any ran.
bool run_warp(int first) {
  const int lanes_here = std::min(32, static_cast<int>(g_block.threads.size()) - first);
  bool ran = false;
  for (int k = 0; k < lanes_here; ++k) {
    Thread& t = g_block.threads[first + (g_reverse_order ? lanes_here - 1 - k : k)];
    if (t.state != State::kReady) continue;
    g_current = &t;
    swapcontext(&g_block.scheduler, &t.context);
    g_current = nullptr;
    ran = true;
  }
  return ran;
}

// Releases the block barrier if every live thread waits at it. Returns whether it did.
bool release_barrier() {
  const char* name = nullptr;
  int any = 0;
  for (const Thread& t : g_block.threads) {
    if (t.state == State::kDone) continue;
    if (t.state != State::kAtBarrier) return false;
    if (name != nullptr && std::strcmp(name, t.barrier) != 0)
      throw std::runtime_error("threads wait at different barriers: " + std::string(name) + " and " + describe(t));
    name = t.barrier;
    any |= t.predicate != 0;
  }
  if (name == nullptr) return false;
  g_block.barrier_result = any;
  for (Thread& t : g_block.threads)
    if (t.state == State::kAtBarrier) t.state = State::kReady;
  return true;
}

void run_block(const uint3& block, const std::function<void()>& body, size_t dynamic_smem) {
  block_idx = block;
  g_block.body = &body;
  g_block.failure.clear();
  std::memset(g_dynamic_smem, 0xff, dynamic_smem);
  for (const auto& [storage, bytes] : g_static_smem) std::memset(storage, 0xff, bytes);
  const int n = static_cast<int>(block_dim.x * block_dim.y * block_dim.z);
  g_block.threads.assign(n, Thread{});
  for (int i = 0; i < n; ++i) {
    Thread& t = g_block.threads[i];
    t.idx = uint3{i % block_dim.x, i / block_dim.x % block_dim.y, i / (block_dim.x * block_dim.y)};
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = stack(i);
    t.context.uc_stack.ss_size = kStackBytes;
    t.context.uc_link = &g_block.scheduler;
    makecontext(&t.context, thread_main, 0);
  }
  // One warp runs at a time, as far as it can (to the next __syncthreads, or its end);
  // then the next warp. Warps therefore drift apart as far as the barriers allow, so a
  // missing barrier lets one warp overwrite or read shared memory too early.
  const int n_warps = (n + 31) / 32;
  if (sigsetjmp(g_fault_return, 1) != 0) {
    char address[32];
    std::snprintf(address, sizeof address, "%p", g_fault_address);
    const auto* fault = static_cast<unsigned char*>(g_fault_address);
    const bool in_smem = fault >= g_smem_guard && fault < g_smem_guard + page_size();
    const std::string who = g_current != nullptr ? where(*g_current) : std::string("a warp instruction");
    g_current = nullptr;
    const char* side = g_guard_before ? "before the start of " : "past the end of ";
    throw std::runtime_error(who + ": out-of-bounds access at " + address + ", " + side +
                             (in_smem ? "dynamic shared memory" : "a buffer"));
  }
  for (;;) {
    bool progressed = false;
    for (int k = 0; k < n_warps && !progressed; ++k) {
      const int first = 32 * (g_reverse_order ? n_warps - 1 - k : k);
      progressed = run_warp(first) || release_warp_ops(first);
    }
    if (!g_block.failure.empty()) throw std::runtime_error(g_block.failure);
    if (progressed) continue;
    if (std::all_of(g_block.threads.begin(), g_block.threads.end(),
                    [](const Thread& t) { return t.state == State::kDone; }))
      return;
    if (release_barrier()) continue;
    std::string text = "deadlock:";
    for (const Thread& t : g_block.threads)
      if (t.state != State::kDone) text += "\n  " + describe(t);
    throw std::runtime_error(text);
  }
}

}  // namespace

const uint3& thread_idx() { return g_current->idx; }

int lane_id() { return linear_index(g_current->idx) % 32; }

int block_barrier(const char* name, int predicate) {
  g_current->state = State::kAtBarrier;
  g_current->barrier = name;
  g_current->predicate = predicate;
  yield();
  return g_block.barrier_result;
}

void warp_op(WarpOp& op) {
  g_current->state = State::kAtWarpOp;
  g_current->op = &op;
  yield();
}

void fail(const char* message) {
  if (g_block.failure.empty()) g_block.failure = g_current != nullptr ? where(*g_current) + ": " + message : message;
}

void queue_async_copy(void* dst, const void* src, int bytes, int src_bytes) {
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || (src_bytes > 0 && reinterpret_cast<uintptr_t>(src) % bytes != 0))
    fail("cp.async with an address that is not aligned to its size");
  g_current->copies.push_back({dst, src, bytes, src_bytes});
}

void wait_async_copies() { apply_copies(*g_current); }

void set_max_dynamic_smem(const void* kernel, int bytes) { g_max_dynamic_smem[kernel] = bytes; }

unsigned char* dynamic_shared_memory() { return g_dynamic_smem; }

void track_static_shared(unsigned char* storage, size_t bytes) {
  std::memset(storage, 0xff, bytes);  // its first use is in a running block, which started without it
  g_static_smem.emplace_back(storage, bytes);
}

void run_grid(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const std::function<void()>& body) {
  const auto opted_in = g_max_dynamic_smem.find(kernel);
  const size_t smem_limit = opted_in == g_max_dynamic_smem.end() ? kDefaultSmemLimit : opted_in->second;
  const size_t threads = size_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535 || dynamic_smem > smem_limit) {
    g_last_error = cudaErrorInvalidConfiguration;
    char text[160];
    std::snprintf(
        text, sizeof text,
        "invalid launch: grid (%u, %u, %u), block (%u, %u, %u), %zu bytes of dynamic shared memory (limit %zu)", grid.x,
        grid.y, grid.z, block.x, block.y, block.z, dynamic_smem, smem_limit);
    g_last_failure = text;
    return;
  }
  grid_dim = grid;
  block_dim = block;
  map_dynamic_smem((dynamic_smem + 15) / 16 * 16);
  const size_t n_blocks = size_t{grid.x} * grid.y * grid.z;
  const FaultHandler fault_handler;
  try {
    for (size_t k = 0; k < n_blocks; ++k) {
      const size_t b = g_reverse_order ? n_blocks - 1 - k : k;
      run_block(uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                      static_cast<unsigned>(b / (size_t{grid.x} * grid.y))},
                body, dynamic_smem);
    }
  } catch (const std::exception& e) {
    char text[96];
    std::snprintf(text, sizeof text, "block (%u, %u, %u), ", block_idx.x, block_idx.y, block_idx.z);
    g_last_failure = text + std::string(e.what());
    g_last_error = cudaErrorLaunchFailure;
  }
}

void configure(bool reverse_order, bool guard_before, int sm_count) {
  g_reverse_order = reverse_order;
  g_guard_before = guard_before;
  g_sm_count = sm_count;
}

const char* last_failure() { return g_last_failure.c_str(); }

void clear_failure() {
  g_last_failure.clear();
  g_last_error = cudaSuccess;
}

}  // namespace emu

unsigned __ballot_sync(unsigned mask, int predicate) {
  struct Resolve {
    static void run(emu::WarpOp* const* lanes, unsigned mask) {
      unsigned bits = 0;
      for (int l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && *static_cast<const int*>(lanes[l]->in)) bits |= 1u << l;
      for (int l = 0; l < 32; ++l)
        if (mask >> l & 1u) *static_cast<unsigned*>(lanes[l]->out) = bits;
    }
  };
  const int in = predicate != 0;
  unsigned out = 0;
  emu::WarpOp op{"__ballot_sync", mask, &in, &out, Resolve::run};
  emu::warp_op(op);
  return out;
}

// ---- The CUDA runtime functions the launchers call -------------------------------------

cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_last_error;
  emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaMemsetAsync(void* dst, int value, size_t count, cudaStream_t) {
  std::memset(dst, value, count);
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > emu::kDeviceSmemLimit)
    return cudaErrorInvalidValue;
  emu::set_max_dynamic_smem(kernel, value);
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int) {
  if (attribute != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = emu::g_sm_count;
  return cudaSuccess;
}
