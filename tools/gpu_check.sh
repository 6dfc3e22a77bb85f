#!/usr/bin/env bash
# The GPU checks, in two halves: Bazel does not run on the GPU machines (TOOLCHAIN.md), so the
# CUDA binaries are built here and run there.
#
#   tools/gpu_check.sh stage    # here: build the GPU tests and benchmark with --config=cuda
#                               # into gpu_bin/ (git-ignored; carry it to the GPU machine)
#   tools/gpu_check.sh run DIR  # there, from the repository root: run them, logs and
#                               # gtest XML / benchmark JSON into DIR
#
# The tests: moe/cuda's kernels against plain C++ references (kernels_test) and against
# moe/dispatch, moe/experts and moe/gate (kernels_vs_cpu_test), and dist/groups' NCCL groups
# (nccl_test: on one GPU only its error cases and a one-rank job, whose groups of one never
# reach NCCL, run; its multi-rank cases need 2 GPUs). The benchmark:
# moe/cuda's kernels against a device copy and a dense cuBLAS GEMM.
#
# kernels_vs_cpu_test and nccl_test link LibTorch: `stage` builds against LIBTORCH_HOME, or
# else the oracle venv's torch (tests/oracles/.venv, PEERS.md), which should be the GPU
# machines' version (2.11.0+cu130, in /opt/torch/.venv there); `run` loads that machine's
# (SY_TORCH_VENV overrides the venv). The LibTorch build leaves this workspace's @libtorch on
# that LibTorch until the next build without LIBTORCH_HOME, which rebuilds from the disk cache.
# `stage` copies beside the binaries the libraries they load that a bare machine may lack
# (Bazel's, Abseil, oneDNN, ...): everything but the C and C++ runtimes, CUDA's and LibTorch's
# own, which the GPU machine has.
#
# `run` finds LibTorch, NCCL, cuBLAS and the CUDA runtime (13.x, what the binaries link) in the
# machine's torch venv (torch/lib, nvidia/*/lib) or in /usr/local/cuda, and takes the C++
# runtime staged from the build machine only where the machine's own is older than the
# binaries need. It names a missing library (or C library version, which cannot be shipped)
# instead of failing inside the loader. It limits each binary's time (120 s for each test,
# 300 s for the benchmark) and all of them together (SY_GPU_CHECK_SECONDS, 450 s: a device
# call may last 600), so a hung test cannot keep the benchmark from running; a binary stopped
# at its limit counts as exit code 5 (124 and 137 would read as the whole call timing out).
# DIR/rc.txt has each binary's exit code; `run` exits with the first non-zero one (a
# benchmark that skipped itself with an error counts as 4: Google Benchmark still exits 0).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$here/gpu_bin"
# Labels; their binaries' names are distinct, so all lie side by side in gpu_bin/.
test_labels=(//moe/cuda:kernels_test //moe/cuda:kernels_vs_cpu_test //dist/groups:nccl_test)
benchmark_label=//moe/cuda:kernels_benchmark
labels=("${test_labels[@]}" "$benchmark_label")
tests=()
for l in "${test_labels[@]}"; do tests+=("${l##*:}"); done
binaries=("${tests[@]}" "${benchmark_label##*:}")

# bazel-bin/ path of a label's binary.
Built() { local l="${1#//}"; echo "bazel-bin/${l%%:*}/${l##*:}"; }

# The version a LibTorch folder (a wheel's torch/) says it is, or nothing.
TorchVersion() { sed -n "s/^__version__ = '\(.*\)'/\1/p" "$1/version.py" 2>/dev/null || true; }

# Libraries every Linux machine has, and libgomp, which LibTorch's lib/ brings: not copied.
base_libs='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libutil|libgomp)\.'
# The C++ runtime: copied to gpu_bin/cxxrt, used there only if the machine's is too old.
cxx_runtime='^(libstdc\+\+|libgcc_s)\.'

total_s=${SY_GPU_CHECK_SECONDS:-450}
test_s=120
benchmark_s=300

stage() {
  cd "$here"
  local torch="${LIBTORCH_HOME:-}"
  if [[ -z "$torch" ]]; then
    torch="$(ls -d "$here"/tests/oracles/.venv/lib/python3*/site-packages/torch 2>/dev/null | head -1 || true)"
  fi
  if [[ -z "$torch" || ! -d "$torch/include" || ! -d "$torch/lib" ]]; then
    echo "gpu_check: kernels_vs_cpu_test and nccl_test link LibTorch: set LIBTORCH_HOME to the torch/ folder of a" \
      "torch==2.11.0 wheel (the GPU machines' version), or create tests/oracles/.venv (tests/oracles/PEERS.md)" >&2
    exit 2
  fi
  local version
  version="$(TorchVersion "$torch")"
  echo "gpu_check: building against LibTorch ${version:-of unknown version} at $torch"
  LIBTORCH_HOME="$torch" tools/bazel build --config=cuda -c opt "${labels[@]}"
  rm -rf "$bin"
  mkdir -p "$bin/solib" "$bin/cxxrt"
  echo "${version:-unknown}" >"$bin/TORCH_VERSION"
  local label b built name path
  for label in "${labels[@]}"; do
    b="${label##*:}"
    built="$(Built "$label")"
    cp "$built" "$bin/"
    # What the loader resolves here, less the base set, CUDA's and LibTorch's (a wheel's
    # lib/ finds its nvidia-* packages as lib/../../nvidia): Bazel's shared libraries (their
    # RPATH points into bazel-bin), Abseil, oneDNN and the rest of what Debian gave this machine.
    while read -r name path; do
      [[ "$path" == /* ]] || continue
      [[ "$name" =~ $base_libs ]] && continue
      if [[ "$name" =~ $cxx_runtime ]]; then
        cp -L "$path" "$bin/cxxrt/$name"
        continue
      fi
      case "$path" in /usr/local/cuda*|"$torch"/*|"$(dirname "$torch")"/nvidia/*) continue ;; esac
      cp -L "$path" "$bin/solib/$name"
    done < <(ldd "$built" | awk '$2 == "=>" {print $1, $3}')
    if ldd "$built" | grep 'not found'; then
      echo "gpu_check: $b: the libraries above do not resolve here either" >&2
      exit 1
    fi
  done
  chmod -R u+w "$bin"
  du -sh "$bin"
}

# Whether gpu_bin/$1's shared libraries all resolve; names the missing ones.
Resolves() {
  local missing
  missing="$(ldd "$bin/$1" | grep 'not found' || true)"
  [[ -z "$missing" ]] && return 0
  echo "gpu_check: $1: libraries or versions not found (LD_LIBRARY_PATH=$LD_LIBRARY_PATH):" >&2
  echo "$missing" >&2
  return 1
}

# Whether some binary needs a newer C++ runtime (GLIBCXX_, CXXABI_ or GCC_ versions) than the
# one the loader finds now.
CxxRuntimeTooOld() {
  local b
  for b in "${binaries[@]}"; do
    ldd "$bin/$b" 2>&1 | grep -qE "version .(GLIBCXX|CXXABI|GCC)_[0-9.]+. not found" && return 0
  done
  return 1
}

# Runs gpu_bin/$1 with the remaining arguments for at most $2 seconds or what is left of the
# whole check's, output into $out/$1.log; appends "$1 CODE" to $out/rc.txt and returns CODE
# (3: its libraries do not resolve; 5: stopped at its limit; 6: not started, no time left).
Exec() {
  local name="$1" limit="$2" code=0
  shift 2
  if ! Resolves "$name"; then
    echo "$name 3" >>"$out/rc.txt"
    return 3
  fi
  local left=$((deadline - SECONDS))
  ((left < limit)) && limit=$left
  if ((limit < 10)); then
    echo "gpu_check: $name: not run, the check's $total_s s are spent" >&2
    echo "$name 6" >>"$out/rc.txt"
    return 6
  fi
  timeout -k 10 "$limit" "$bin/$name" "$@" 2>&1 | tee "$out/$name.log" || code=$?
  if ((code == 124 || code == 137)); then
    echo "gpu_check: $name: stopped after $limit s" >&2
    code=5
  fi
  echo "$name $code" >>"$out/rc.txt"
  return "$code"
}

run() {
  local out="${1:?usage: gpu_check.sh run OUTPUT_DIR}"
  local deadline=$((SECONDS + total_s))
  mkdir -p "$out"
  out="$(cd "$out" && pwd)"  # a relative OUTPUT_DIR names the folder it was given from
  local venv="${SY_TORCH_VENV:-/opt/torch/.venv}"
  [[ -d "$venv" ]] && venv="$(cd "$venv" && pwd)"
  cd "$here"  # kernels_test reads moe/gate/testdata/megatron_router.txt from here
  for b in "${binaries[@]}"; do
    [[ -x "$bin/$b" ]] || { echo "gpu_check: $bin/$b missing: run 'stage' first and carry gpu_bin" >&2; exit 2; }
  done
  local path="$bin/solib" torch_lib
  torch_lib="$(ls -d "$venv"/lib/python3*/site-packages/torch/lib 2>/dev/null | head -1 || true)"
  if [[ -n "$torch_lib" ]]; then
    local built_against there
    built_against="$(cat "$bin/TORCH_VERSION" 2>/dev/null || echo unknown)"
    there="$(TorchVersion "$(dirname "$torch_lib")")"
    echo "gpu_check: LibTorch ${there:-of unknown version} at $torch_lib (built against $built_against)" |
      tee "$out/torch.txt"
    [[ "$built_against" == "$there" ]] || echo "gpu_check: warning: the tests were built against LibTorch $built_against" >&2
    path="$path:$torch_lib"
  fi
  for d in "$venv"/lib/python3*/site-packages/nvidia/*/lib /usr/local/cuda/lib64; do
    [[ -d "$d" ]] && path="$path:$d"
  done
  export LD_LIBRARY_PATH="$path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  if CxxRuntimeTooOld; then
    echo "gpu_check: this machine's C++ runtime is older than the binaries need: using gpu_bin/cxxrt" >&2
    export LD_LIBRARY_PATH="$bin/cxxrt:$LD_LIBRARY_PATH"
  fi
  timeout 20 nvidia-smi -L 2>&1 | tee "$out/nvidia-smi.txt" || true
  : >"$out/rc.txt"
  local rc=0 code
  # Each binary runs if its libraries resolve (a missing one is named), under its time limit.
  for t in "${tests[@]}"; do
    code=0
    Exec "$t" "$test_s" --gtest_output="xml:$out/$t.xml" || code=$?
    ((rc)) || rc=$code
  done
  local bench="${benchmark_label##*:}"
  code=0
  Exec "$bench" "$benchmark_s" --benchmark_counters_tabular=true \
    --benchmark_out="$out/$bench.json" --benchmark_out_format=json || code=$?
  # Google Benchmark exits 0 even when benchmarks skipped themselves with an error.
  if ((code == 0)) && grep -q 'ERROR OCCURRED' "$out/$bench.log"; then
    echo "gpu_check: some benchmarks failed (ERROR OCCURRED above)" >&2
    code=4
    echo "$bench (errors) 4" >>"$out/rc.txt"
  fi
  ((rc)) || rc=$code
  cat "$out/rc.txt"
  return "$rc"
}

case "${1:-}" in
  stage) stage ;;
  run) shift; run "$@" ;;
  *) echo "usage: tools/gpu_check.sh stage | run OUTPUT_DIR" >&2; exit 2 ;;
esac
