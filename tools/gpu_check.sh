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
# missing library instead of failing inside the loader, and exits non-zero if the test fails.
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
  # The shared libraries Bazel built for them (their RPATH points into bazel-bin).
  find -L bazel-bin/_solib_k8 -maxdepth 1 -name 'libmoe_*.so' -exec cp {} "$bin/solib/" \;
  chmod -R u+w "$bin"
  du -sh "$bin"
}

run() {
  local out="${1:?usage: gpu_check.sh run OUTPUT_DIR}"
  mkdir -p "$out"
  cd "$here"  # the test reads moe/gate/testdata/megatron_router.txt from here
  [[ -x "$bin/kernels_test" ]] || { echo "gpu_check: $bin/kernels_test missing: run 'stage' first and carry gpu_bin" >&2; exit 2; }
  local path="$bin/solib"
  for d in /opt/torch/.venv/lib/python3*/site-packages/nvidia/*/lib /usr/local/cuda/lib64; do
    [[ -d "$d" ]] && path="$path:$d"
  done
  export LD_LIBRARY_PATH="$path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  nvidia-smi -L 2>&1 | tee "$out/nvidia-smi.txt" || true
  local missing
  missing="$(ldd "$bin/kernels_test" "$bin/kernels_benchmark" | grep 'not found' || true)"
  if [[ -n "$missing" ]]; then
    echo "gpu_check: libraries not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2
    echo "$missing" >&2
    exit 3
  fi
  local rc=0
  "$bin/kernels_test" --gtest_output="xml:$out/kernels_test.xml" 2>&1 | tee "$out/kernels_test.log" || rc=$?
  "$bin/kernels_benchmark" --benchmark_counters_tabular=true --benchmark_out="$out/kernels_benchmark.json" \
    --benchmark_out_format=json 2>&1 | tee "$out/kernels_benchmark.log" || { local s=$?; ((rc)) || rc=$s; }
  return "$rc"
}

case "${1:-}" in
  stage) stage ;;
  run) shift; run "$@" ;;
  *) echo "usage: tools/gpu_check.sh stage | run OUTPUT_DIR" >&2; exit 2 ;;
esac
