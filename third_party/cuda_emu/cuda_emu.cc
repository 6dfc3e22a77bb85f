// The emulator's runtime: device memory, launches on fibers, the runtime calls and cuBLAS's
// GEMMs that moe/cuda uses. See cuda_emu.h for what is modelled.
#include "third_party/cuda_emu/cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <set>
#include <vector>

#include <cublas_v2.h>
#include <cuda_bf16.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SY_EMU_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define SY_EMU_TSAN 1
#endif

namespace sy_emu {
namespace {

// --- Errors -------------------------------------------------------------------------------

std::mutex mu;  // guards everything below that host threads share
thread_local cudaError_t last_error = cudaSuccess;  // per host thread, as the runtime keeps it
cudaError_t sticky_error = cudaSuccess;  // a kernel fault: every later call, on any thread, returns it
std::string last_diagnostic;

void Diagnose(const std::string& message) {
  std::fprintf(stderr, "cuda_emu: %s\n", message.c_str());
  std::lock_guard<std::mutex> l(mu);
  last_diagnostic = message;
}

cudaError_t Fail(cudaError_t e, const std::string& message) {
  Diagnose(message);
  std::lock_guard<std::mutex> l(mu);
  last_error = e;
  return e;
}

// A fault inside a kernel or a library call: the context is lost, as on a GPU.
cudaError_t Fault(cudaError_t e, const std::string& message) {
  Diagnose(message);
  std::lock_guard<std::mutex> l(mu);
  if (sticky_error == cudaSuccess) sticky_error = e;
  last_error = e;
  return e;
}

cudaError_t Sticky() {
  std::lock_guard<std::mutex> l(mu);
  return sticky_error;
}

// --- Device memory ------------------------------------------------------------------------

std::map<uintptr_t, size_t> allocations;  // base → bytes, guarded by mu

bool InDevice(uintptr_t p, size_t bytes) {
  auto it = allocations.upper_bound(p);
  if (it == allocations.begin()) return false;
  --it;
  return p >= it->first && p + bytes <= it->first + it->second;
}

std::set<cudaStream_t> streams;  // created ones; null is the default stream
// Whether the device has stream-ordered memory pools: none until the first query of
// cudaDevAttrMemoryPoolsSupported, which says yes, and flipped by every query after that
// (see cudaDeviceGetAttribute).
bool pools = false;

// cudaSuccess where the device has pools, else a failed call of `what`.
cudaError_t NeedPools(const char* what) {
  {
    std::lock_guard<std::mutex> l(mu);
    if (pools) return cudaSuccess;
  }
  return Fail(cudaErrorNotSupported,
              std::string(what) + " on a device without memory pools (cudaDevAttrMemoryPoolsSupported said 0)");
}

bool KnownStream(cudaStream_t s) {
  std::lock_guard<std::mutex> l(mu);
  return s == nullptr || streams.count(s) != 0;
}

// --- Fibers -------------------------------------------------------------------------------

enum State : int { kRunnable, kBarrier, kShuffle, kDone };

struct Fiber {
  ucontext_t ctx;
  ThreadContext tc;
  int linear = 0;
  char* stack = nullptr;  // the usable part, above a guard page
  // What the fiber waits on. Atomic (relaxed) because, to ThreadSanitizer, fibers and the
  // scheduler are threads, and this is the scheduler's bookkeeping, not the kernel's memory.
  std::atomic<int> state{kRunnable};
  std::atomic<unsigned> mask{0};
  std::atomic<int> src{0}, width{32};
  std::atomic<uint64_t> value{0}, result{0};
  std::atomic<const char*> what{nullptr};
#ifdef SY_EMU_ASAN
  void* fake_stack = nullptr;
#endif
#ifdef SY_EMU_TSAN
  void* tsan = nullptr;
#endif
};

constexpr size_t kStackBytes = 256 * 1024;

struct Block {
  const std::function<void()>* body = nullptr;
  std::vector<Fiber*> fibers;  // one per thread of the block
  ucontext_t scheduler;
  std::atomic<Fiber*> current{nullptr};
  int warps = 0;
  std::atomic<int64_t> barriers{0};  // barriers released so far in this launch (atomic: see Fiber)
#ifdef SY_EMU_ASAN
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_bottom = nullptr;
  size_t scheduler_size = 0;
#endif
#ifdef SY_EMU_TSAN
  void* tsan_scheduler = nullptr;
#endif
};

#ifdef SY_EMU_TSAN
// ThreadSanitizer's happens-before edges: the scheduler's set-up of a block before its
// threads start, everything a block's threads did before the host goes on, and each barrier.
// (Globals, as blocks run one at a time, so that a fiber can acquire before it reads anything.)
// Barriers alternate between two tokens: a thread released from barrier g reaches barrier
// g + 1 (and releases there) before the slowest has acquired g's, so one token would order
// the fast thread's accesses between the two barriers before the slow one's.
char start_token, end_token, barrier_tokens[2];
#endif

thread_local Block* running = nullptr;

Fiber& Me() {
  Block* b = running;
  Fiber* f = b ? b->current.load(std::memory_order_relaxed) : nullptr;
  if (f == nullptr) {
    std::fprintf(stderr, "cuda_emu: a device built-in (threadIdx, __syncthreads, a shuffle) used outside a kernel\n");
    std::abort();
  }
  return *f;
}

void ToFiber(Block& b, Fiber& f) {
  b.current.store(&f, std::memory_order_relaxed);
#ifdef SY_EMU_ASAN
  __sanitizer_start_switch_fiber(&b.scheduler_fake_stack, f.stack, kStackBytes);
#endif
#ifdef SY_EMU_TSAN
  __tsan_switch_to_fiber(f.tsan, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&b.scheduler, &f.ctx);
#ifdef SY_EMU_ASAN
  __sanitizer_finish_switch_fiber(b.scheduler_fake_stack, nullptr, nullptr);
#endif
  b.current.store(nullptr, std::memory_order_relaxed);
}

// From the running fiber back to the scheduler, after setting what it waits on.
void ToScheduler(Block& b, Fiber& f) {
#ifdef SY_EMU_TSAN
  // What this thread did so far comes before the host's next steps even if the block is
  // abandoned here (a launch that fails leaves its threads where they wait); b, on the
  // host's stack, is read before that.
  void* scheduler = b.tsan_scheduler;
  __tsan_release(&end_token);
#endif
#ifdef SY_EMU_ASAN
  __sanitizer_start_switch_fiber(&f.fake_stack, b.scheduler_bottom, b.scheduler_size);
#endif
#ifdef SY_EMU_TSAN
  __tsan_switch_to_fiber(scheduler, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&f.ctx, &b.scheduler);
#ifdef SY_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &b.scheduler_bottom, &b.scheduler_size);
#endif
}

void Entry() {
#ifdef SY_EMU_TSAN
  __tsan_acquire(&start_token);
#endif
  Block& b = *running;
  Fiber& f = *b.current.load(std::memory_order_relaxed);
#ifdef SY_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_bottom, &b.scheduler_size);
#endif
  (*b.body)();
#ifdef SY_EMU_TSAN
  // The last read of the scheduler's memory (b lives on its stack) before the release that
  // orders this thread's accesses before whatever the host does after the launch.
  void* scheduler = b.tsan_scheduler;
  __tsan_release(&end_token);
#endif
  f.state.store(kDone, std::memory_order_relaxed);
#ifdef SY_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, b.scheduler_bottom, b.scheduler_size);
#endif
#ifdef SY_EMU_TSAN
  __tsan_switch_to_fiber(scheduler, __tsan_switch_to_fiber_no_sync);
#endif
  setcontext(&b.scheduler);
  std::abort();  // not reached: setcontext does not return
}

const char* StateName(int s) {
  switch (s) {
    case kRunnable: return "running";
    case kBarrier: return "__syncthreads";
    case kShuffle: return "a shuffle";
    default: return "exited";
  }
}

// Resolves the shuffles of warp w whose lanes have all arrived; false if none could be (with
// `error` set if one is wrong).
bool ResolveWarp(Block& b, int w, std::string& error) {
  bool progressed = false;
  const int n = static_cast<int>(b.fibers.size());
  for (int lane = 0; lane < 32; ++lane) {
    const int i = w * 32 + lane;
    if (i >= n || b.fibers[i]->state.load(std::memory_order_relaxed) != kShuffle) continue;
    Fiber& f = *b.fibers[i];
    const unsigned mask = f.mask.load(std::memory_order_relaxed);
    if (const int width = f.width.load(std::memory_order_relaxed); !ValidWidth(width)) {
      error = std::string(f.what.load()) + " in lane " + std::to_string(lane) + " of warp " + std::to_string(w) +
              ": width " + std::to_string(width) + " is not a power of two up to 32";
      return false;
    }
    if (!(mask >> lane & 1u)) {
      char buf[16];
      std::snprintf(buf, sizeof(buf), "%08x", mask);
      error = std::string(f.what.load()) + " in lane " + std::to_string(lane) + " of warp " + std::to_string(w) +
              ": its mask " + buf + " leaves it out";
      return false;
    }
    bool complete = true;
    for (int l = 0; l < 32 && complete; ++l) {
      if (!(mask >> l & 1u)) continue;
      const int j = w * 32 + l;
      complete = j < n && b.fibers[j]->state.load(std::memory_order_relaxed) == kShuffle &&
                 b.fibers[j]->mask.load(std::memory_order_relaxed) == mask &&
                 b.fibers[j]->what.load(std::memory_order_relaxed) == f.what.load(std::memory_order_relaxed);
    }
    if (!complete) continue;
    for (int l = 0; l < 32; ++l) {
      if (!(mask >> l & 1u)) continue;
      Fiber& g = *b.fibers[w * 32 + l];
      const int src = g.src.load(std::memory_order_relaxed);
      if (src < 0 || src >= 32 || !(mask >> src & 1u)) {
        error = std::string(g.what.load()) + " in lane " + std::to_string(l) + " of warp " + std::to_string(w) +
                " reads lane " + std::to_string(src) + ", outside its mask";
        return false;
      }
      g.result.store(b.fibers[w * 32 + src]->value.load(std::memory_order_relaxed), std::memory_order_relaxed);
    }
    for (int l = 0; l < 32; ++l) {
      if (mask >> l & 1u) b.fibers[w * 32 + l]->state.store(kRunnable, std::memory_order_relaxed);
    }
    progressed = true;
  }
  return progressed;
}

std::string Describe(const Block& b) {
  std::string s;
  const int n = static_cast<int>(b.fibers.size());
  for (int i = 0; i < n;) {
    const int st = b.fibers[i]->state.load(std::memory_order_relaxed);
    int j = i;
    while (j < n && b.fibers[j]->state.load(std::memory_order_relaxed) == st) ++j;
    s += (s.empty() ? "" : ", ") + std::string("threads ") + std::to_string(i) + "-" + std::to_string(j - 1) + ": " +
         StateName(st);
    if (st == kShuffle) {
      char buf[32];
      std::snprintf(buf, sizeof(buf), " (mask %08x)", b.fibers[i]->mask.load());
      s += buf;
    }
    i = j;
  }
  return s;
}

std::string Dim(const dim3& d) {
  return "(" + std::to_string(d.x) + ", " + std::to_string(d.y) + ", " + std::to_string(d.z) + ")";
}

// One block to the end; an empty string, or what went wrong.
std::string RunBlock(Block& b, const char* kernel, dim3 grid, dim3 block, uint3 block_idx) {
  const int n = static_cast<int>(block.x * block.y * block.z);
  for (int i = 0; i < n; ++i) {
    Fiber& f = *b.fibers[i];
    f.state.store(kRunnable, std::memory_order_relaxed);
    f.linear = i;
    f.tc.thread_idx = make_uint3(i % block.x, i / block.x % block.y, i / (block.x * block.y));
    f.tc.block_idx = block_idx;
    f.tc.block_dim = block;
    f.tc.grid_dim = grid;
#ifdef SY_EMU_ASAN
    __asan_unpoison_memory_region(f.stack, kStackBytes);  // frames left by the last block
#endif
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, Entry, 0);
  }
#ifdef SY_EMU_TSAN
  __tsan_release(&start_token);
#endif
  // Warps in a random order, each run as far as it can go (its lanes in a random order to
  // their next sync point, its shuffles resolved, again) before the next, as a GPU may run one
  // warp far ahead of another; then the barrier, if every thread has reached it. So code
  // missing a barrier reads another thread's data before or after it is written. (Seeded by
  // the block: runs repeat.)
  std::string error;
  std::mt19937 random(block_idx.x + 65536u * (block_idx.y + 65536u * block_idx.z));
  std::vector<int> warp_order(b.warps), lanes;
  std::iota(warp_order.begin(), warp_order.end(), 0);
  for (;;) {
    bool ran = false;
    std::shuffle(warp_order.begin(), warp_order.end(), random);
    for (int w : warp_order) {
      for (;;) {
        lanes.clear();
        for (int i = w * 32; i < std::min(n, w * 32 + 32); ++i) {
          if (b.fibers[i]->state.load(std::memory_order_relaxed) == kRunnable) lanes.push_back(i);
        }
        if (lanes.empty()) break;
        std::shuffle(lanes.begin(), lanes.end(), random);
        for (int i : lanes) ToFiber(b, *b.fibers[i]);
        ran = true;
        if (!ResolveWarp(b, w, error)) break;
      }
      if (!error.empty()) break;
    }
    if (!error.empty()) break;
    int done = 0, at_barrier = 0;
    for (int i = 0; i < n; ++i) {
      const int st = b.fibers[i]->state.load(std::memory_order_relaxed);
      done += st == kDone;
      at_barrier += st == kBarrier;
    }
    if (done == n) break;
    if (at_barrier + done == n) {
      b.barriers.fetch_add(1, std::memory_order_relaxed);
      for (int i = 0; i < n; ++i) {
        if (b.fibers[i]->state.load(std::memory_order_relaxed) == kBarrier) {
          b.fibers[i]->state.store(kRunnable, std::memory_order_relaxed);
        }
      }
      continue;
    }
    if (!ran) {
      error = "block cannot go on: " + Describe(b);
      break;
    }
  }
#ifdef SY_EMU_TSAN
  __tsan_acquire(&end_token);
#endif
  if (!error.empty()) error = std::string(kernel) + " block " + Dim(dim3(block_idx.x, block_idx.y, block_idx.z)) + ": " + error;
  return error;
}

// Stacks with a guard page below each (they grow down), kept for the process's life.
const std::vector<std::unique_ptr<Fiber>>& FiberPool(int n) {
  static std::vector<std::unique_ptr<Fiber>> pool;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (static_cast<int>(pool.size()) < n) {
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "cuda_emu: no memory for a fiber stack\n");
      std::abort();
    }
    mprotect(m, page, PROT_NONE);
    auto f = std::make_unique<Fiber>();
    f->stack = static_cast<char*>(m) + page;
#ifdef SY_EMU_TSAN
    // One ThreadSanitizer thread per pool entry, reused by every block: blocks are ordered
    // one after another anyway (see RunBlock).
    f->tsan = __tsan_create_fiber(0);
#endif
    pool.push_back(std::move(f));
  }
  return pool;
}

std::mutex launch_mu;  // one launch at a time: the fiber pool is shared

}  // namespace

const ThreadContext& Current() { return Me().tc; }

int Lane() { return Me().linear % 32; }

void Barrier() {
  Block& b = *running;
  Fiber& f = Me();
#ifdef SY_EMU_TSAN
  char* token = &barrier_tokens[b.barriers.load(std::memory_order_relaxed) % 2];
  __tsan_release(token);
#endif
  f.state.store(kBarrier, std::memory_order_relaxed);
  ToScheduler(b, f);
#ifdef SY_EMU_TSAN
  __tsan_acquire(token);
#endif
}

uint64_t Shuffle(const char* what, unsigned mask, uint64_t bits, int src_lane, int width) {
  Block& b = *running;
  Fiber& f = Me();
  f.mask.store(mask, std::memory_order_relaxed);
  f.src.store(src_lane, std::memory_order_relaxed);
  f.width.store(width, std::memory_order_relaxed);
  f.value.store(bits, std::memory_order_relaxed);
  f.what.store(what, std::memory_order_relaxed);
  f.state.store(kShuffle, std::memory_order_relaxed);
  ToScheduler(b, f);
  return f.result.load(std::memory_order_relaxed);
}

bool IsDeviceRange(const void* p, size_t bytes) {
  std::lock_guard<std::mutex> l(mu);
  return InDevice(reinterpret_cast<uintptr_t>(p), bytes);
}

std::string LastDiagnostic() {
  std::lock_guard<std::mutex> l(mu);
  return last_diagnostic;
}

void RunKernel(const char* kernel, dim3 grid, dim3 block, size_t shared_bytes, cudaStream_t stream,
               const std::string& bad_argument, const std::function<void()>& thread) {
  if (Sticky() != cudaSuccess) return;
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || grid.x == 0 ||
      grid.y == 0 || grid.z == 0 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 ||
      shared_bytes > 48 * 1024) {
    Fail(cudaErrorInvalidConfiguration, std::string(kernel) + ": launch of grid " + Dim(grid) + ", block " +
                                            Dim(block) + ", " + std::to_string(shared_bytes) +
                                            " bytes of shared memory is outside the limits");
    return;
  }
  if (!KnownStream(stream)) {
    Fail(cudaErrorInvalidResourceHandle, std::string(kernel) + ": launched on a stream that does not exist");
    return;
  }
  if (!bad_argument.empty()) {
    Fault(cudaErrorIllegalAddress, bad_argument);
    return;
  }
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  if (blocks > (uint64_t{1} << 24)) {
    Fail(cudaErrorNotSupported, std::string(kernel) + ": a grid of " + std::to_string(blocks) +
                                    " blocks is more than the emulator runs (16M)");
    return;
  }
  std::lock_guard<std::mutex> l(launch_mu);
  const int n = static_cast<int>(threads);
  Block b;
  b.body = &thread;
  for (int i = 0; i < n; ++i) b.fibers.push_back(FiberPool(n)[i].get());
  b.warps = (n + 31) / 32;
#ifdef SY_EMU_TSAN
  b.tsan_scheduler = __tsan_get_current_fiber();
#endif
  Block* outer = running;
  running = &b;
  // Blocks in a shuffled order (the same for every launch of this shape): a GPU promises none.
  std::vector<uint3> order;
  order.reserve(blocks);
  for (uint32_t z = 0; z < grid.z; ++z) {
    for (uint32_t y = 0; y < grid.y; ++y) {
      for (uint32_t x = 0; x < grid.x; ++x) order.push_back(make_uint3(x, y, z));
    }
  }
  std::mt19937 random(grid.x * 31 + grid.y * 17 + grid.z * 7 + n);
  std::shuffle(order.begin(), order.end(), random);
  std::string error;
  for (size_t i = 0; i < order.size() && error.empty(); ++i) error = RunBlock(b, kernel, grid, block, order[i]);
  running = outer;
  if (!error.empty()) Fault(cudaErrorLaunchFailure, error);
}

namespace {

// --- cuBLAS -------------------------------------------------------------------------------

float LoadElement(const void* p, cudaDataType_t t, int64_t i) {
  if (t == CUDA_R_32F) return static_cast<const float*>(p)[i];
  return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
}
void StoreElement(void* p, cudaDataType_t t, int64_t i, float v) {
  if (t == CUDA_R_32F) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v);
  }
}
size_t ElementBytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

// The checks of a column-major C[m, n] = alpha·op(A)·op(B) + beta·C: sizes and leading
// dimensions as cuBLAS documents them, types, and operands inside device allocations.
cublasStatus_t CheckGemm(const char* what, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                         const void* A, cudaDataType_t at, int lda, const void* B, cudaDataType_t bt, int ldb, void* C,
                         cudaDataType_t ct, int ldc, cublasComputeType_t compute) {
  const bool ok_op = (ta == CUBLAS_OP_N || ta == CUBLAS_OP_T) && (tb == CUBLAS_OP_N || tb == CUBLAS_OP_T);
  if (!ok_op || m < 0 || n < 0 || k < 0 || lda < std::max(1, ta == CUBLAS_OP_N ? m : k) ||
      ldb < std::max(1, tb == CUBLAS_OP_N ? k : n) || ldc < std::max(1, m)) {
    Diagnose(std::string(what) + ": invalid value (m " + std::to_string(m) + ", n " + std::to_string(n) + ", k " +
             std::to_string(k) + ", lda " + std::to_string(lda) + ", ldb " + std::to_string(ldb) + ", ldc " +
             std::to_string(ldc) + ")");
    return CUBLAS_STATUS_INVALID_VALUE;
  }
  // fp32 or bf16 operands, C of their type (or fp32 C for bf16 operands), fp32 compute.
  if (at != bt || (at != CUDA_R_32F && at != CUDA_R_16BF) || (ct != at && ct != CUDA_R_32F) ||
      (compute != CUBLAS_COMPUTE_32F && compute != CUBLAS_COMPUTE_32F_PEDANTIC)) {
    Diagnose(std::string(what) + ": type combination not emulated");
    return CUBLAS_STATUS_NOT_SUPPORTED;
  }
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  const size_t e = ElementBytes(at);
  // Elements up to the last one touched of each column-major operand.
  auto extent = [](int rows, int cols, int ld) { return (static_cast<size_t>(cols) - 1) * ld + rows; };
  const bool a_ok = k == 0 || IsDeviceRange(A, e * (ta == CUBLAS_OP_N ? extent(m, k, lda) : extent(k, m, lda)));
  const bool b_ok = k == 0 || IsDeviceRange(B, e * (tb == CUBLAS_OP_N ? extent(k, n, ldb) : extent(n, k, ldb)));
  if (!a_ok || !b_ok || !IsDeviceRange(C, ElementBytes(ct) * extent(m, n, ldc))) {
    Fault(cudaErrorIllegalAddress, std::string(what) + ": operand " + (!a_ok ? "A" : !b_ok ? "B" : "C") +
                                       " is not inside one device allocation");
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  return CUBLAS_STATUS_SUCCESS;
}

// The product, after CheckGemm: fp32 accumulation in order of k.
void ComputeGemm(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, float alpha, const void* A,
                 cudaDataType_t at, int lda, const void* B, cudaDataType_t bt, int ldb, float beta, void* C,
                 cudaDataType_t ct, int ldc) {
  for (int j = 0; j < n; ++j) {
    for (int i = 0; i < m; ++i) {
      float acc = 0.f;
      for (int l = 0; l < k; ++l) {
        const float a = LoadElement(A, at, ta == CUBLAS_OP_N ? i + int64_t{l} * lda : l + int64_t{i} * lda);
        const float bv = LoadElement(B, bt, tb == CUBLAS_OP_N ? l + int64_t{j} * ldb : j + int64_t{l} * ldb);
        acc += a * bv;
      }
      const int64_t c = i + int64_t{j} * ldc;
      // beta = 0: C is not read (it may hold NaN), as BLAS specifies.
      StoreElement(C, ct, c, beta == 0.f ? alpha * acc : alpha * acc + beta * LoadElement(C, ct, c));
    }
  }
}

}  // namespace
}  // namespace sy_emu

using sy_emu::Fail;
using sy_emu::Fault;
using sy_emu::Sticky;

// Events hold the host time at which they were recorded (every operation has completed by
// then): elapsed times are the emulator's, meaningless as GPU timings but positive.
struct CUevent_st {
  bool recorded = false;
  std::chrono::steady_clock::time_point at;
};

struct cublasContext {
  cudaStream_t stream = nullptr;
  cublasMath_t mode = CUBLAS_DEFAULT_MATH;
};

namespace {

constexpr size_t kTail = 256;  // see cudaMalloc

// (With sy_emu::mu held.)
void FreeAllocation(void* p) {
#ifdef SY_EMU_ASAN
  __asan_unpoison_memory_region(p, sy_emu::allocations.at(reinterpret_cast<uintptr_t>(p)) + kTail);
#endif
  std::free(p);
}

}  // namespace

extern "C" {

// --- Runtime ------------------------------------------------------------------------------

cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> l(sy_emu::mu);
  const cudaError_t e = sy_emu::last_error != cudaSuccess ? sy_emu::last_error : sy_emu::sticky_error;
  sy_emu::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError() {
  std::lock_guard<std::mutex> l(sy_emu::mu);
  return sy_emu::last_error != cudaSuccess ? sy_emu::last_error : sy_emu::sticky_error;
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevicePointer: return "cudaErrorInvalidDevicePointer";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    case cudaErrorIllegalAddress: return "cudaErrorIllegalAddress";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
    case cudaErrorUnknown: return "cudaErrorUnknown";
    case cudaErrorNotSupported: return "cudaErrorNotSupported";
    default: return "cudaError (not emulated)";
  }
}

const char* cudaGetErrorString(cudaError_t e) { return cudaGetErrorName(e); }

cudaError_t cudaMalloc(void** p, size_t bytes) {
  if (p == nullptr) return Fail(cudaErrorInvalidValue, "cudaMalloc: null result pointer");
  if (const cudaError_t s = Sticky(); s != cudaSuccess) return s;
  // 256 bytes more than asked, never handed out: no host allocation can then begin where
  // this one ends, so a pointer one past its end is still this allocation's. (Under
  // AddressSanitizer the tail is poisoned, so an access there is still reported.)
  void* m = nullptr;
  if (bytes > (size_t{1} << 48) || posix_memalign(&m, 256, bytes + kTail) != 0) {
    return Fail(cudaErrorMemoryAllocation, "cudaMalloc: out of memory for " + std::to_string(bytes) + " bytes");
  }
  std::memset(m, 0xff, bytes);  // a GPU leaves it undefined: NaN as floats
#ifdef SY_EMU_ASAN
  __asan_poison_memory_region(static_cast<char*>(m) + bytes, kTail);
#endif
  std::lock_guard<std::mutex> l(sy_emu::mu);
  sy_emu::allocations[reinterpret_cast<uintptr_t>(m)] = bytes;
  *p = m;
  return cudaSuccess;
}

cudaError_t cudaFree(void* p) {
  if (p == nullptr) return cudaSuccess;
  {
    std::lock_guard<std::mutex> l(sy_emu::mu);
    if (sy_emu::allocations.count(reinterpret_cast<uintptr_t>(p)) != 0) {
      FreeAllocation(p);
      sy_emu::allocations.erase(reinterpret_cast<uintptr_t>(p));
      return sy_emu::sticky_error;
    }
  }
  return Fail(cudaErrorInvalidDevicePointer, "cudaFree: not the start of a device allocation");
}

cudaError_t cudaMallocAsync(void** p, size_t bytes, cudaStream_t stream) {
  if (!sy_emu::KnownStream(stream)) return Fail(cudaErrorInvalidResourceHandle, "cudaMallocAsync: unknown stream");
  if (const cudaError_t e = sy_emu::NeedPools("cudaMallocAsync"); e != cudaSuccess) return e;
  return cudaMalloc(p, bytes);
}

cudaError_t cudaFreeAsync(void* p, cudaStream_t stream) {
  if (!sy_emu::KnownStream(stream)) return Fail(cudaErrorInvalidResourceHandle, "cudaFreeAsync: unknown stream");
  if (const cudaError_t e = sy_emu::NeedPools("cudaFreeAsync"); e != cudaSuccess) return e;
  return cudaFree(p);
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind) {
  if (const cudaError_t s = Sticky(); s != cudaSuccess) return s;
  if (bytes == 0) return cudaSuccess;
  const bool dst_dev = sy_emu::IsDeviceRange(dst, bytes), src_dev = sy_emu::IsDeviceRange(src, bytes);
  // cudaMemcpyDefault: either side may be either, but a device side must lie in one allocation.
  const bool ok = (kind == cudaMemcpyDefault && (dst_dev || !sy_emu::IsDeviceRange(dst, 0)) &&
                   (src_dev || !sy_emu::IsDeviceRange(src, 0))) ||
                  (kind == cudaMemcpyHostToDevice && dst_dev && !sy_emu::IsDeviceRange(src, 0)) ||
                  (kind == cudaMemcpyDeviceToHost && src_dev && !sy_emu::IsDeviceRange(dst, 0)) ||
                  (kind == cudaMemcpyDeviceToDevice && dst_dev && src_dev) ||
                  (kind == cudaMemcpyHostToHost && !sy_emu::IsDeviceRange(dst, 0) && !sy_emu::IsDeviceRange(src, 0));
  if (!ok) {
    return Fail(cudaErrorInvalidValue, "cudaMemcpy of " + std::to_string(bytes) +
                                           " bytes: a device side outside one device allocation, or the wrong kind (" +
                                           std::to_string(static_cast<int>(kind)) + ")");
  }
  std::memmove(dst, src, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream) {
  if (!sy_emu::KnownStream(stream)) return Fail(cudaErrorInvalidResourceHandle, "cudaMemcpyAsync: unknown stream");
  return cudaMemcpy(dst, src, bytes, kind);
}

cudaError_t cudaMemset(void* p, int value, size_t bytes) {
  if (const cudaError_t s = Sticky(); s != cudaSuccess) return s;
  if (bytes == 0) return cudaSuccess;
  if (!sy_emu::IsDeviceRange(p, bytes)) {
    return Fail(cudaErrorInvalidValue, "cudaMemset of " + std::to_string(bytes) + " bytes outside one device allocation");
  }
  std::memset(p, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream) {
  if (!sy_emu::KnownStream(stream)) return Fail(cudaErrorInvalidResourceHandle, "cudaMemsetAsync: unknown stream");
  return cudaMemset(p, value, bytes);
}

cudaError_t cudaDeviceSynchronize() { return Sticky(); }

cudaError_t cudaDeviceReset() {
  std::lock_guard<std::mutex> l(sy_emu::mu);
  for (const auto& [base, bytes] : sy_emu::allocations) FreeAllocation(reinterpret_cast<void*>(base));
  sy_emu::allocations.clear();
  for (cudaStream_t s : sy_emu::streams) delete reinterpret_cast<char*>(s);
  sy_emu::streams.clear();
  sy_emu::last_error = sy_emu::sticky_error = cudaSuccess;
  sy_emu::pools = false;
  return cudaSuccess;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  if (!sy_emu::KnownStream(stream)) return Fail(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize: unknown stream");
  return Sticky();
}

cudaError_t cudaStreamCreate(cudaStream_t* stream) {
  if (stream == nullptr) return Fail(cudaErrorInvalidValue, "cudaStreamCreate: null result pointer");
  *stream = reinterpret_cast<cudaStream_t>(new char);
  std::lock_guard<std::mutex> l(sy_emu::mu);
  sy_emu::streams.insert(*stream);
  return cudaSuccess;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  std::lock_guard<std::mutex> l(sy_emu::mu);
  if (stream == nullptr || sy_emu::streams.erase(stream) == 0) return cudaErrorInvalidResourceHandle;
  delete reinterpret_cast<char*>(stream);
  return cudaSuccess;
}

cudaError_t cudaGetDeviceCount(int* count) {
  if (count == nullptr) return Fail(cudaErrorInvalidValue, "cudaGetDeviceCount: null result pointer");
  *count = 1;
  return cudaSuccess;
}

cudaError_t cudaEventCreate(cudaEvent_t* event) {
  if (event == nullptr) return Fail(cudaErrorInvalidValue, "cudaEventCreate: null result pointer");
  *event = new CUevent_st;
  return Sticky();
}

cudaError_t cudaEventDestroy(cudaEvent_t event) {
  if (event == nullptr) return Fail(cudaErrorInvalidResourceHandle, "cudaEventDestroy: null event");
  delete event;
  return cudaSuccess;
}

cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  if (event == nullptr) return Fail(cudaErrorInvalidResourceHandle, "cudaEventRecord: null event");
  if (!sy_emu::KnownStream(stream)) return Fail(cudaErrorInvalidResourceHandle, "cudaEventRecord: unknown stream");
  event->recorded = true;
  event->at = std::chrono::steady_clock::now();
  return Sticky();
}

cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  if (event == nullptr) return Fail(cudaErrorInvalidResourceHandle, "cudaEventSynchronize: null event");
  return Sticky();
}

cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  if (ms == nullptr || start == nullptr || end == nullptr) {
    return Fail(cudaErrorInvalidValue, "cudaEventElapsedTime: null argument");
  }
  if (const cudaError_t s = Sticky(); s != cudaSuccess) return s;
  if (!start->recorded || !end->recorded) {
    return Fail(cudaErrorInvalidResourceHandle, "cudaEventElapsedTime: an event was never recorded");
  }
  *ms = std::chrono::duration<float, std::milli>(end->at - start->at).count();
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  if (device == nullptr) return Fail(cudaErrorInvalidValue, "cudaGetDevice: null result pointer");
  *device = 0;
  return Sticky();
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (value == nullptr || device != 0) return Fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: bad arguments");
  if (attr == cudaDevAttrMemoryPoolsSupported) {
    // Yes and no in turn, and the device then has pools or not: callers' both paths run.
    std::lock_guard<std::mutex> l(sy_emu::mu);
    sy_emu::pools = !sy_emu::pools;
    *value = sy_emu::pools;
    return cudaSuccess;
  }
  return Fail(cudaErrorInvalidValue, "cudaDeviceGetAttribute: attribute " + std::to_string(static_cast<int>(attr)) +
                                         " is not emulated");
}

// --- cuBLAS -------------------------------------------------------------------------------

cublasStatus_t cublasCreate_v2(cublasHandle_t* handle) {
  if (handle == nullptr) return CUBLAS_STATUS_INVALID_VALUE;
  *handle = new cublasContext;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasDestroy_v2(cublasHandle_t handle) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  delete handle;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetStream_v2(cublasHandle_t handle, cudaStream_t stream) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!sy_emu::KnownStream(stream)) return CUBLAS_STATUS_INVALID_VALUE;
  handle->stream = stream;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasSetMathMode(cublasHandle_t handle, cublasMath_t mode) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  handle->mode = mode;
  return CUBLAS_STATUS_SUCCESS;
}

const char* cublasGetStatusName(cublasStatus_t s) {
  switch (s) {
    case CUBLAS_STATUS_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
    case CUBLAS_STATUS_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
    case CUBLAS_STATUS_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
    case CUBLAS_STATUS_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
    case CUBLAS_STATUS_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
    default: return "CUBLAS_STATUS (not emulated)";
  }
}

const char* cublasGetStatusString(cublasStatus_t s) { return cublasGetStatusName(s); }

cublasStatus_t cublasGemmEx(cublasHandle_t handle, cublasOperation_t transa, cublasOperation_t transb, int m, int n,
                            int k, const void* alpha, const void* A, cudaDataType Atype, int lda, const void* B,
                            cudaDataType Btype, int ldb, const void* beta, void* C, cudaDataType Ctype, int ldc,
                            cublasComputeType_t computeType, cublasGemmAlgo_t algo) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (Sticky() != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;
  const cublasStatus_t st = sy_emu::CheckGemm("cublasGemmEx", transa, transb, m, n, k, A, Atype, lda, B, Btype, ldb,
                                              C, Ctype, ldc, computeType);
  if (st == CUBLAS_STATUS_SUCCESS) {
    sy_emu::ComputeGemm(transa, transb, m, n, k, *static_cast<const float*>(alpha), A, Atype, lda, B, Btype, ldb,
                        *static_cast<const float*>(beta), C, Ctype, ldc);
  }
  return st;
}

cublasStatus_t cublasGemmGroupedBatchedEx(cublasHandle_t handle, const cublasOperation_t transa_array[],
                                          const cublasOperation_t transb_array[], const int m_array[],
                                          const int n_array[], const int k_array[], const void* alpha_array,
                                          const void* const Aarray[], cudaDataType_t Atype, const int lda_array[],
                                          const void* const Barray[], cudaDataType_t Btype, const int ldb_array[],
                                          const void* beta_array, void* const Carray[], cudaDataType_t Ctype,
                                          const int ldc_array[], int group_count, const int group_size[],
                                          cublasComputeType_t computeType) {
  if (handle == nullptr) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (Sticky() != cudaSuccess) return CUBLAS_STATUS_EXECUTION_FAILED;
  if (group_count < 0) return CUBLAS_STATUS_INVALID_VALUE;
  int64_t problems = 0;
  for (int g = 0; g < group_count; ++g) {
    if (group_size[g] < 0) return CUBLAS_STATUS_INVALID_VALUE;
    problems += group_size[g];
  }
  if (problems == 0) return CUBLAS_STATUS_SUCCESS;
  // The pointer arrays live on the device; the rest (sizes, alpha, beta) on the host.
  const size_t bytes = problems * sizeof(void*);
  if (!sy_emu::IsDeviceRange(Aarray, bytes) || !sy_emu::IsDeviceRange(Barray, bytes) ||
      !sy_emu::IsDeviceRange(Carray, bytes)) {
    Fault(cudaErrorIllegalAddress, "cublasGemmGroupedBatchedEx: Aarray, Barray or Carray is not a device array of " +
                                       std::to_string(problems) + " pointers");
    return CUBLAS_STATUS_EXECUTION_FAILED;
  }
  const float* alpha = static_cast<const float*>(alpha_array);
  const float* beta = static_cast<const float*>(beta_array);
  // Every problem is checked before any is computed.
  for (int pass = 0; pass < 2; ++pass) {
    int64_t p = 0;
    for (int g = 0; g < group_count; ++g) {
      for (int i = 0; i < group_size[g]; ++i, ++p) {
        if (pass == 0) {
          const cublasStatus_t st = sy_emu::CheckGemm(
              "cublasGemmGroupedBatchedEx", transa_array[g], transb_array[g], m_array[g], n_array[g], k_array[g],
              Aarray[p], Atype, lda_array[g], Barray[p], Btype, ldb_array[g], Carray[p], Ctype, ldc_array[g],
              computeType);
          if (st != CUBLAS_STATUS_SUCCESS) return st;
        } else if (m_array[g] > 0 && n_array[g] > 0) {
          sy_emu::ComputeGemm(transa_array[g], transb_array[g], m_array[g], n_array[g], k_array[g], alpha[g],
                              Aarray[p], Atype, lda_array[g], Barray[p], Btype, ldb_array[g], beta[g], Carray[p],
                              Ctype, ldc_array[g]);
        }
      }
    }
  }
  return CUBLAS_STATUS_SUCCESS;
}

}  // extern "C"
