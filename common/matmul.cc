#include "common/matmul.h"

#include <array>
#include <atomic>
#include <cstdlib>
#include <list>
#include <memory>
#include <mutex>
#include <unordered_map>
#include <utility>

#include <omp.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <dnnl.hpp>

#include "common/cpu_clones.h"

namespace switchyard::common {
namespace {

// A 2-D operand as oneDNN sees it: row-major (stride {ld, 1}) or column-major (stride {1, ld}).
// Size-1 dimensions carry whatever stride LibTorch gave them; they are normalised here so that
// equal layouts make equal cache keys. False for any other layout (broadcast, gaps in both).
bool PlainStrides(const at::Tensor& t, int64_t& s0, int64_t& s1) {
  const int64_t r = t.size(0), c = t.size(1);
  if ((c == 1 || t.stride(1) == 1) && (r == 1 || t.stride(0) >= c)) {
    s0 = r == 1 ? c : t.stride(0), s1 = 1;
    return true;
  }
  if ((r == 1 || t.stride(0) == 1) && (c == 1 || t.stride(1) >= r)) {
    s0 = 1, s1 = c == 1 ? r : t.stride(1);
    return true;
  }
  return false;
}

// Enough for the shapes of a fine-grained layer whose per-expert row counts change every step
// (measured: 64 experts of ~512 rows, 100 steps of fresh tokens, needed ~1270 primitives).
constexpr int64_t kDefaultCapacity = 2048;

// dtypes (operands, out), M, N, K, a's strides, b's strides, out's row stride, accumulate, and the intra-op
// threads at creation (oneDNN plans a primitive's work split for the threads it will have).
using Key = std::array<int64_t, 11>;

struct KeyHash {
  size_t operator()(const Key& k) const {
    uint64_t h = 0xcbf29ce484222325ull;
    for (int64_t v : k) h = (h ^ static_cast<uint64_t>(v)) * 0x100000001b3ull;
    return static_cast<size_t>(h);
  }
};

struct Entry {
  Key key;
  bool ok = false;  // false: oneDNN refused this problem; LibTorch computes it
  dnnl::matmul prim;
  dnnl::memory::desc scratch;  // the scratch memory it needs (user scratchpad mode)
};

dnnl::engine& Engine() {
  static dnnl::engine* engine = new dnnl::engine(dnnl::engine::kind::cpu, 0);  // never destroyed: used at exit
  return *engine;
}

class Cache {
 public:
  // The primitive for `key`, created on a miss (outside the lock: creation generates code).
  // Shared, so that an entry evicted while another thread still runs it stays alive.
  std::shared_ptr<const Entry> Get(const Key& key, const dnnl::memory::desc& a, const dnnl::memory::desc& b,
                                   const dnnl::memory::desc& c) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = index_.find(key);
      if (it != index_.end()) {
        ++hits_;
        lru_.splice(lru_.begin(), lru_, it->second);
        return *it->second;
      }
      ++misses_;
    }
    std::shared_ptr<const Entry> e = Create(key, a, b, c);
    std::lock_guard<std::mutex> lock(mu_);
    if (!e->ok) ++refused_;
    if (index_.count(key) == 0 && capacity_ > 0) {
      lru_.push_front(e);
      index_[key] = lru_.begin();
      Trim();
    }
    return e;
  }

  MatmulCacheStats Stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(lru_.size()), hits_, misses_, capacity_, refused_};
  }

  void Reset(int64_t capacity) {
    std::lock_guard<std::mutex> lock(mu_);
    capacity_ = capacity < 0 ? 0 : capacity;
    lru_.clear(), index_.clear();
    hits_ = misses_ = refused_ = 0;
  }

 private:
  static std::shared_ptr<const Entry> Create(const Key& key, const dnnl::memory::desc& a,
                                              const dnnl::memory::desc& b, const dnnl::memory::desc& c) {
    auto made = std::make_shared<Entry>();
    Entry& e = *made;
    e.key = key;
    try {
      dnnl::primitive_attr attr;
      attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
      if (key[9] != 0) {
        dnnl::post_ops po;
        po.append_sum(1.f);
        attr.set_post_ops(po);
      }
#if DNNL_VERSION_MAJOR >= 3
      dnnl::matmul::primitive_desc pd(Engine(), a, b, c, attr);
#else
      dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(a, b, c), attr, Engine());
#endif
      e.scratch = pd.scratchpad_desc();
      e.prim = dnnl::matmul(pd);
      e.ok = true;
    } catch (const dnnl::error&) {
      e.ok = false;
    }
    return made;
  }

  void Trim() {
    while (static_cast<int64_t>(lru_.size()) > capacity_) {
      index_.erase(lru_.back()->key);
      lru_.pop_back();
    }
  }

  std::mutex mu_;
  std::list<std::shared_ptr<const Entry>> lru_;  // most recently used first
  std::unordered_map<Key, std::list<std::shared_ptr<const Entry>>::iterator, KeyHash> index_;
  int64_t capacity_ = 0, hits_ = 0, misses_ = 0, refused_ = 0;
};

// SWITCHYARD_MATMUL_CACHE_CAPACITY overrides the default capacity.
int64_t InitialCapacity() {
  const char* env = std::getenv("SWITCHYARD_MATMUL_CACHE_CAPACITY");
  if (env == nullptr || *env == '\0') return kDefaultCapacity;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  return (*end == '\0' && v >= 0) ? v : kDefaultCapacity;
}

Cache& TheCache() {
  static Cache* cache = [] {
    Cache* c = new Cache();
    c->Reset(InitialCapacity());
    return c;
  }();
  return *cache;
}

std::atomic<MatmulBackend> backend{MatmulBackend::kAuto};

// Per-thread scratch memory for the primitives (user scratchpad mode: primitives hold none).
void* Scratch(size_t bytes) {
  struct Buffer {
    void* p = nullptr;
    size_t size = 0;
    ~Buffer() { std::free(p); }
  };
  thread_local Buffer buf;
  if (bytes > buf.size) {
    std::free(buf.p);
    const size_t size = (bytes + 63) / 64 * 64;
    buf.p = std::aligned_alloc(64, size);
    buf.size = buf.p == nullptr ? 0 : size;
    if (buf.p == nullptr) throw std::bad_alloc();
  }
  return buf.p;
}

// Inside a parallel region (a task of a loop that runs several products at once, one per
// thread), this thread's OpenMP thread count is 1 for the product: oneDNN then plans the
// primitive for one thread and runs it on the calling thread, instead of planning a split
// over threads that the region's nested level does not have.
// (at::get_num_threads first: on a thread's first call it sets the thread's OpenMP count to
// LibTorch's, which would undo the 1 if it came after.)
class OneThreadIfNested {
 public:
  OneThreadIfNested() : before_(omp_in_parallel() ? at::get_num_threads() : 0) {
    if (before_ > 0) omp_set_num_threads(1);
  }
  ~OneThreadIfNested() {
    if (before_ > 0) omp_set_num_threads(before_);
  }
  OneThreadIfNested(const OneThreadIfNested&) = delete;
  OneThreadIfNested& operator=(const OneThreadIfNested&) = delete;

 private:
  int before_;
};

// Whether two non-empty 2-D tensors' element ranges share bytes.
bool Overlap(const at::Tensor& x, const at::Tensor& y) {
  auto span = [](const at::Tensor& t) {
    const uintptr_t p = reinterpret_cast<uintptr_t>(t.data_ptr());
    const int64_t extent = (t.size(0) - 1) * t.stride(0) + (t.size(1) - 1) * t.stride(1) + 1;
    return std::pair<uintptr_t, uintptr_t>{p, p + static_cast<uintptr_t>(extent * t.element_size())};
  };
  const auto [x0, x1] = span(x);
  const auto [y0, y1] = span(y);
  return x0 < y1 && y0 < x1;
}

void AtenMatmul(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (out.scalar_type() != a.scalar_type()) {
    // bf16 operands, fp32 out: the product of the widened operands, in fp32.
    TORCH_CHECK(a.scalar_type() == at::kBFloat16 && b.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kFloat,
                "MatmulOut: operands ", a.scalar_type(), " and ", b.scalar_type(), " with an out of ",
                out.scalar_type(), " (one dtype, or bf16 operands into fp32)");
    at::Tensor o = out;
    const at::Tensor product = at::mm(a.to(at::kFloat), b.to(at::kFloat));
    accumulate ? o.add_(product) : o.copy_(product);
    return;
  }
  if (accumulate) {
    // addmm_ on a const view: the view shares out's storage.
    at::Tensor o = out;
    o.addmm_(a, b);
  } else {
    at::Tensor o = out;
    at::mm_out(o, a, b);
  }
}

}  // namespace

void MatmulOut(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  const OneThreadIfNested one_thread;  // for LibTorch's paths below too
  if (a.dim() == 2 && b.dim() == 2 && out.dim() == 2 && out.numel() > 0 && a.numel() > 0 && b.numel() > 0 &&
      (Overlap(out, a) || Overlap(out, b))) {
    // out shares memory with an operand: the product goes through a temporary (a kernel writing
    // out while it still reads the operand would read its own results).
    const at::Tensor product = at::empty(out.sizes(), out.options());
    AtenMatmul(product, a, b, /*accumulate=*/false);
    at::Tensor o = out;
    accumulate ? o.add_(product) : o.copy_(product);
    return;
  }
  const at::ScalarType dt = a.scalar_type(), odt = out.scalar_type();
  const bool eligible = backend.load() == MatmulBackend::kAuto && a.dim() == 2 && b.dim() == 2 && out.dim() == 2 &&
                        a.device().is_cpu() && b.device().is_cpu() && out.device().is_cpu() &&
                        b.scalar_type() == dt && (odt == dt || (dt == at::kBFloat16 && odt == at::kFloat)) &&
                        (dt == at::kFloat || (dt == at::kBFloat16 && HasAvx512Bf16())) && a.size(1) == b.size(0) &&
                        out.size(0) == a.size(0) && out.size(1) == b.size(1);
  int64_t as0, as1, bs0, bs1, cs0, cs1;
  if (!eligible || !PlainStrides(a, as0, as1) || !PlainStrides(b, bs0, bs1) || !PlainStrides(out, cs0, cs1) ||
      cs1 != 1) {
    AtenMatmul(out, a, b, accumulate);
    return;
  }
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  if (M == 0 || N == 0) return;
  if (K == 0) {
    if (!accumulate) {
      at::Tensor o = out;
      o.zero_();
    }
    return;
  }
  using dnnl::memory;
  const memory::data_type mdt = dt == at::kFloat ? memory::data_type::f32 : memory::data_type::bf16;
  const memory::data_type odt_dnnl = odt == at::kFloat ? memory::data_type::f32 : memory::data_type::bf16;
  const memory::desc ad({M, K}, mdt, {as0, as1}), bd({K, N}, mdt, {bs0, bs1}), cd({M, N}, odt_dnnl, {cs0, 1});
  const Key key{static_cast<int64_t>(dt) * 64 + static_cast<int64_t>(odt), M, N, K, as0, as1, bs0, bs1, cs0,
                accumulate ? 1 : 0, at::get_num_threads()};  // 1 in a nested task (above)
  const std::shared_ptr<const Entry> entry = TheCache().Get(key, ad, bd, cd);
  const Entry& e = *entry;
  if (!e.ok) {
    AtenMatmul(out, a, b, accumulate);
    return;
  }
  dnnl::engine& eng = Engine();
  thread_local dnnl::stream stream(eng);
  memory am(ad, eng, a.data_ptr()), bm(bd, eng, b.data_ptr()), cm(cd, eng, out.data_ptr());
  std::unordered_map<int, memory> args{{DNNL_ARG_SRC, am}, {DNNL_ARG_WEIGHTS, bm}, {DNNL_ARG_DST, cm}};
  const size_t scratch_bytes = e.scratch.get_size();
  if (scratch_bytes > 0) args.emplace(DNNL_ARG_SCRATCHPAD, memory(e.scratch, eng, Scratch(scratch_bytes)));
  e.prim.execute(stream, args);
  stream.wait();
}

void SetMatmulBackend(MatmulBackend b) { backend.store(b); }

MatmulCacheStats GetMatmulCacheStats() { return TheCache().Stats(); }

void SetMatmulCacheCapacity(int64_t capacity) { TheCache().Reset(capacity); }

}  // namespace switchyard::common
