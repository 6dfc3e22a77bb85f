#!/usr/bin/env bash
# Runs a test binary with N intra-op threads: with_intra_op_threads.sh N BINARY [ARGS...].
# Debian's LibTorch starts a process with one intra-op thread, so code that runs only with
# several (parallel chunks, experts side by side) needs its tests run this way too.
set -euo pipefail
threads=$1
binary=$2
shift 2
OMP_NUM_THREADS=$threads exec "$binary" "$@"
