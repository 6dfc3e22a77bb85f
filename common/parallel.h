#ifndef SWITCHYARD_COMMON_PARALLEL_H_
#define SWITCHYARD_COMMON_PARALLEL_H_

// at::parallel_for, made safe to call: include this instead of <ATen/Parallel.h>.
//
// With an OpenMP LibTorch (Debian's and pytorch.org's builds), the parallel body of
// at::parallel_for is an inline `#pragma omp parallel` in LibTorch's headers; a file compiled
// without -fopenmp ignores the pragma and runs every loop on one thread, without a warning.
// (Found in session 4: permute, unpermute and the router all ran on one core of two.) Compile
// such files with SY_PARALLEL_COPTS (tools/copts.bzl).
#include <ATen/Parallel.h>

#if AT_PARALLEL_OPENMP && !defined(_OPENMP)
#error "at::parallel_for would run serially: compile this file with SY_PARALLEL_COPTS (-fopenmp)"
#endif

#endif  // SWITCHYARD_COMMON_PARALLEL_H_
