#!/usr/bin/env bash
# The GPU checks, in two halves: Bazel does not run on the GPU machines (TOOLCHAIN.md), so the
# CUDA binaries are built here and run there.
#
#   tools/gpu_check.sh stage    # here: build moe/cuda's test and benchmark with --config=cuda
#                               # into gpu_bin/ (git-ignored; carry it to the GPU machine)
#   tools/gpu_check.sh run DIR  # there, from the repository root: run them, logs and
#                               # gtest XML / benchmark JSON into DIR
#
# `run` finds cuBLAS and the CUDA runtime (13.x, what the binaries link) in the machine's
# torch venv (/opt/torch/.venv: its nvidia/*/lib folders) or in /usr/local/cuda, names a
# missing library instead of failing inside the loader, limits each binary's time (120 s for
# the test, 360 s for the benchmark), and exits non-zero if either fails (a benchmark that
# skipped itself with an error counts: Google Benchmark still exits 0 then).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$here/gpu_bin"
targets=(//moe/cuda:kernels_test //moe/cuda:kernels_benchmark)

stage() {
  cd "$here"
  tools/bazel build --config=cuda -c opt "${targets[@]}"
  rm -rf "$bin"
  mkdir -p "$bin/solib"
  cp bazel-bin/moe/cuda/kernels_test bazel-bin/moe/cuda/kernels_benchmark "$bin/"
  # The shared libraries Bazel built for them (their RPATH points into bazel-bin), and Google
  # Benchmark's, which the GPU machine's system need not have.
  find -L bazel-bin/_solib_k8 -maxdepth 1 -name 'libmoe_*.so' -exec cp {} "$bin/solib/" \;
  ldd "$bin/kernels_benchmark" | awk '/libbenchmark/ {print $3}' | xargs -r -I{} cp -L {} "$bin/solib/"
  chmod -R u+w "$bin"
  du -sh "$bin"
}

# Whether gpu_bin/$1's shared libraries all resolve; names the missing ones.
Resolves() {
  local missing
  missing="$(ldd "$bin/$1" | grep 'not found' || true)"
  [[ -z "$missing" ]] && return 0
  echo "gpu_check: $1: libraries not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2
  echo "$missing" >&2
  return 1
}

run() {
  local out="${1:?usage: gpu_check.sh run OUTPUT_DIR}"
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"  # a relative OUTPUT_DIR names the folder it was given from
  cd "$here"  # the test reads moe/gate/testdata/megatron_router.txt from here
  [[ -x "$bin/kernels_test" ]] || { echo "gpu_check: $bin/kernels_test missing: run 'stage' first and carry gpu_bin" >&2; exit 2; }
  local path="$bin/solib"
  for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib /usr/local/cuda/lib64; do
    [[ -d "$d" ]] && path="$path:$d"
  done
  export LD_LIBRARY_PATH="$path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi -L 2>&1 | tee "$out/nvidia-smi.txt" || true
  local rc=0
  # Each binary runs if its libraries resolve (a missing one is named), under a time limit.
  if Resolves kernels_test; then
    timeout -k 15 120 "$bin/kernels_test" --gtest_output="xml:$out/kernels_test.xml" 2>&1 | tee "$out/kernels_test.log" ||
      rc=$?
  else
    rc=3
  fi
  if Resolves kernels_benchmark; then
    timeout -k 15 360 "$bin/kernels_benchmark" --benchmark_counters_tabular=true \
      --benchmark_out="$out/kernels_benchmark.json" --benchmark_out_format=json 2>&1 |
      tee "$out/kernels_benchmark.log" || { local s=$?; ((rc)) || rc=$s; }
    # Google Benchmark exits 0 even when benchmarks skipped themselves with an error.
    if grep -q 'ERROR OCCURRED' "$out/kernels_benchmark.log"; then
      echo "gpu_check: some benchmarks failed (ERROR OCCURRED above)" >&2
      ((rc)) || rc=4
    fi
  else
    ((rc)) || rc=3
  fi
  return "$rc"
}

case "${1:-}" in
  stage) stage ;;
  run) shift; run "$@" ;;
  *) echo "usage: tools/gpu_check.sh stage | run OUTPUT_DIR" >&2; exit 2 ;;
esac
