// ThreadSanitizer builds only (--config=tsan); other builds compile this file to nothing.
//
// GOMP_parallel, the entry of every OpenMP parallel region (each at::parallel_for here),
// wrapped so that ThreadSanitizer sees the region's fork and join. They happen inside libgomp,
// which is not instrumented; without these edges each write before a region read inside it,
// and each write inside read after it, was reported as a race (session 10: every report of the
// permute, experts and layer tests). The wrapper releases before the region, each thread
// acquires on entry and releases on exit, and the caller acquires after the join, around
// libgomp's own GOMP_parallel (found with dlsym(RTLD_NEXT)). Threads of one region still race
// with each other where they touch the same memory: a counter bumped by each of MakePlan's
// blocks is reported.
#if defined(__SANITIZE_THREAD__)

#include <dlfcn.h>
#include <sanitizer/tsan_interface.h>

#include <cstdio>
#include <cstdlib>

namespace {

struct Region {
  void (*fn)(void*);
  void* data;
  char join;  // the address the threads release on at the end
};

void RunAnnotated(void* p) {
  Region* r = static_cast<Region*>(p);
  __tsan_acquire(r);
  r->fn(r->data);
  __tsan_release(&r->join);
}

using GompParallel = void (*)(void (*)(void*), void*, unsigned, unsigned);

GompParallel Real() {
  static const GompParallel real = [] {
    auto f = reinterpret_cast<GompParallel>(dlsym(RTLD_NEXT, "GOMP_parallel"));
    if (f == nullptr) {
      std::fprintf(stderr, "tsan_support: libgomp's GOMP_parallel not found\n");
      std::abort();
    }
    return f;
  }();
  return real;
}

}  // namespace

// Reports ThreadSanitizer cannot judge, because the synchronisation behind them is in
// uninstrumented code (found in the layer test: 104 reports, none in our code):
// - oneDNN: its primitive cache hands primitive descriptors between threads; its interceptor
//   calls (allocations, copies) are not checked.
// - c10d's Gloo work objects signal completion after unlocking, and the waiter then destroys
//   the condition variable.
// - Tensors freed on another thread once c10's intrusive_ptr reference count (atomics in
//   LibTorch) reaches 0: a free racing with the last use. So no free or delete is reported as
//   racing ("race:free" matches every stack with a frame named like it, the interceptor's);
//   use-after-free stays AddressSanitizer's to find (--config=asan).
extern "C" const char* __tsan_default_suppressions() {
  return "called_from_lib:libdnnl.so\n"
         "race:c10d::ProcessGroupGloo::AsyncWork::finishWorkGloo\n"
         "race:^operator delete\n"
         "race:free\n";
}

extern "C" void GOMP_parallel(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags) {
  Region r{fn, data, 0};
  __tsan_release(&r);
  Real()(RunAnnotated, &r, num_threads, flags);
  __tsan_acquire(&r.join);
}

#endif  // __SANITIZE_THREAD__
