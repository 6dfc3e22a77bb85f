#!/usr/bin/env bash
# tools/gpu_check.sh's `run` half on stand-in binaries (shell scripts named like the real
# ones), since the real run only happens on a GPU machine, whose time is scarce: the exit
# codes it reports (per binary in rc.txt, and its own), the benchmark's error check, the
# overall deadline that keeps a hung test from starving the rest, and a missing binary.
set -uo pipefail

script="$1"
root="${TEST_TMPDIR:-$(mktemp -d)}/gpu_check_test"
failures=0

# A fresh tree: tools/gpu_check.sh and gpu_bin/ with stand-ins that succeed.
Tree() {
  rm -rf "$root"
  mkdir -p "$root/tools" "$root/gpu_bin/solib" "$root/gpu_bin/cxxrt"
  cp "$script" "$root/tools/gpu_check.sh"
  for b in kernels_test kernels_vs_cpu_test nccl_test kernels_benchmark; do
    Binary "$b" 'echo ok'
  done
}
Binary() { printf '#!/bin/sh\n%s\n' "$2" >"$root/gpu_bin/$1" && chmod +x "$root/gpu_bin/$1"; }

# Runs the check; compares its exit code and rc.txt with the expected ones.
Expect() {
  local name="$1" want_rc="$2" want_codes="$3" seconds="${4:-450}"
  local got_rc=0
  (cd "$root" && SY_TORCH_VENV=/nonexistent SY_GPU_CHECK_SECONDS="$seconds" tools/gpu_check.sh run out) \
    >"$root/log" 2>&1 || got_rc=$?
  local got_codes
  got_codes="$(tr '\n' ';' 2>/dev/null <"$root/out/rc.txt")"
  if [[ "$got_rc" != "$want_rc" || "$got_codes" != "$want_codes" ]]; then
    echo "FAIL $name: exit $got_rc (want $want_rc), rc.txt '$got_codes' (want '$want_codes')"
    sed 's/^/    /' "$root/log"
    failures=$((failures + 1))
  else
    echo "ok   $name"
  fi
}

Tree
Expect "all pass" 0 "kernels_test 0;kernels_vs_cpu_test 0;nccl_test 0;kernels_benchmark 0;"

Tree
Binary kernels_test 'exit 1'
Binary kernels_benchmark 'echo "BM_X ERROR OCCURRED: no CUDA device"'
Expect "a failing test and a benchmark error" 1 \
  "kernels_test 1;kernels_vs_cpu_test 0;nccl_test 0;kernels_benchmark 0;kernels_benchmark (errors) 4;"

Tree
Binary kernels_benchmark 'echo "BM_X ERROR OCCURRED: no CUDA device"'
Expect "only a benchmark error" 4 \
  "kernels_test 0;kernels_vs_cpu_test 0;nccl_test 0;kernels_benchmark 0;kernels_benchmark (errors) 4;"

# A test that hangs is stopped at the deadline (12 s here) with code 5, not 124; what is left
# after it is not started (6).
Tree
Binary kernels_vs_cpu_test 'sleep 300'
Expect "a hung test" 5 "kernels_test 0;kernels_vs_cpu_test 5;nccl_test 6;kernels_benchmark 6;" 12

Tree
rm "$root/gpu_bin/nccl_test"
Expect "a binary missing" 2 ""

if ((failures)); then
  echo "$failures case(s) failed"
  exit 1
fi
