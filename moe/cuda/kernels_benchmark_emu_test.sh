#!/usr/bin/env bash
# Runs every benchmark of kernels_benchmark (tiny shapes, CPU emulator, a few iterations each,
# as Google Benchmark 1.7 has no fixed count); fails if the
# binary fails, a benchmark is missing from its report, or one reports an error (a failed CUDA
# call skips a benchmark with its message, and Google Benchmark still exits 0).
set -euo pipefail
bin="$1"
out="${TEST_TMPDIR:-$(mktemp -d)}/report.json"
"$bin" --benchmark_min_time=0.001 --benchmark_format=json --benchmark_out="$out" > /dev/null
python3 - "$out" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))["benchmarks"]
names = [b["name"] for b in report]
want = ["BM_PermuteRows/fine:0", "BM_PermuteRows/fine:1", "BM_SumRows/fine:0", "BM_SumRows/fine:1",
        "BM_WeightedSumBackward/fine:0", "BM_WeightedSumBackward/fine:1",
        "BM_CopyD2D/fine:0", "BM_CopyD2D/fine:1", "BM_GroupedGemm/fine:0", "BM_GroupedGemm/fine:1",
        "BM_GroupedGemmLoop/fine:0", "BM_GroupedGemmLoop/fine:1", "BM_DenseGemm/fine:0",
        "BM_DenseGemm/fine:1", "BM_TopKRoute/E:64/k:2", "BM_TopKRoute/E:256/k:8"]
missing = [w for w in want if not any(n.startswith(w) for n in names)]
errors = [(b["name"], b.get("error_message", "")) for b in report if b.get("error_occurred")]
if missing or errors:
    print("missing:", missing, "\nerrors:", errors)
    sys.exit(1)
print(len(report), "benchmarks ran without an error")
PY
