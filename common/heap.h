// Keeps freed memory in the process heap instead of returning it to the kernel.
//
// LibTorch's CPU allocator is plain malloc: every buffer above glibc's mmap threshold comes
// from a fresh mmap and goes back with munmap, so each training step page-faults (and the
// kernel zeroes) all of its large activations and gradients again. Measured on the MoE
// layer's permutation (moe_layer_benchmark, 2 cores): up to 2-3x slower with the default.
// Call once at start-up (workers, benchmarks); equivalent to MALLOC_MMAP_MAX_=0 and a large
// MALLOC_TRIM_THRESHOLD_ in the environment. The cost: peak memory stays reserved.
#ifndef COMMON_HEAP_H_
#define COMMON_HEAP_H_

namespace switchyard::common {

// Returns false if glibc refused a setting (the process then keeps its defaults).
bool RetainFreedMemory();

}  // namespace switchyard::common

#endif  // COMMON_HEAP_H_
