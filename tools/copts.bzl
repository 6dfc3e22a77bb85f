"""Compile flags shared by every Switchyard target (one place, like Abseil's ABSL_DEFAULT_COPTS)."""

SY_DEFAULT_COPTS = [
    "-Wall",
    "-Wextra",
    "-Wno-unused-parameter",
    # LibTorch's headers trip these under -Wextra; they say nothing about our code.
    "-Wno-missing-field-initializers",
]

SY_TEST_COPTS = SY_DEFAULT_COPTS + [
    "-Wno-sign-compare",
]

# For code whose tests loop over many cases (exhaustive layout checks): -O0 makes them
# minutes instead of seconds.
SY_OPT_COPTS = ["-O2"]

# For the CPU kernels (permutation, activations): -O3 so GCC vectorises their inner loops
# (GCC 12's -O2 cost model leaves most of them scalar). -fno-trapping-math lets it turn the
# float selects of branch-free code (clamps, NaN checks) into vector blends instead of
# branches that stop vectorisation (the fused SwiGLU's exponential stayed scalar without it);
# nothing here traps floating-point exceptions, and NaN and inf keep their IEEE meaning.
SY_KERNEL_COPTS = ["-O3", "-fno-trapping-math"]

# For code that calls at::parallel_for. LibTorch (Debian's and pytorch.org's) parallelises
# with OpenMP, and the parallel body of at::parallel_for is inline in its headers
# (ATen/ParallelOpenMP.h): a file compiled without -fopenmp silently gets the serial
# fallback. Such files include common/parallel.h, which refuses to compile without it.
# (@libtorch//:torch links the OpenMP runtime.)
SY_PARALLEL_COPTS = ["-fopenmp"]
