#!/usr/bin/env bash
# The launcher as a user meets it: the default job, --dry_run, and every bad spec.
source "${TEST_SRCDIR}/${TEST_WORKSPACE}/tests/launcher/lib.sh"
ROOT="${TEST_SRCDIR}/${TEST_WORKSPACE}"

# The README's job: 4 ranks check the cluster and the launcher exits 0.
"$LAUNCHER" --spec="$ROOT/launcher/examples/tiny.pbtxt" >"$TMP/tiny.out" 2>"$TMP/tiny.err" || fail "tiny exited $?"
expect_in "$TMP/tiny.out" 'cluster check passed'
expect_in "$TMP/tiny.out" 'sum of rank+1 = 10, expected 10'
expect_in "$TMP/tiny.out" 'tp 1 × cp 1 × dp 4 × pp 1; experts etp 1 × ep 2 × edp 2'
expect_in "$TMP/tiny.out" 'on each of 15 group kinds'
expect_in "$TMP/tiny.out" 'MoE layer check passed: layers.0.mlp (4 experts, top-2, ffn 128, fp32) under ep 2 × etp 1, 3 forward+backward steps of 128 tokens on rank 0'
expect_in "$TMP/tiny.out" 'output, input and parameter gradients match the single-process layer'"'"'s'
expect_in "$TMP/tiny.out" 'this job checks the cluster and its MoE layer only'
expect_in "$TMP/tiny.out" '[launcher] node 0: all 4 workers finished'
pass "default job"

# The MoE layer check under TP with sequence parallelism, ETP and EP, in bf16, and under CP.
cat > "$TMP/sp.pbtxt" <<'SPEC'
name: "sp"
model { hidden_size: 32 num_heads: 4 num_layers: 2 seq_len: 64 ffn_hidden_size: 64 moe { num_experts: 4 top_k: 2 ffn_hidden_size: 32 } }
parallel { tp: 2 ep: 2 sequence_parallel: true }
train { global_batch_size: 4 precision: BF16 }
launch { nproc_per_node: 4 master_port: 0 rendezvous_timeout_s: 30 collective_timeout_s: 30 }
SPEC
"$LAUNCHER" --spec="$TMP/sp.pbtxt" >"$TMP/sp.out" 2>"$TMP/sp.err" || fail "tp 2 sp exited $?: $(cat "$TMP/sp.err")"
expect_in "$TMP/sp.out" 'MoE layer check passed: layers.0.mlp (4 experts, top-2, ffn 32, bf16) under ep 2 × etp 2, 3 forward+backward steps of 64 tokens on rank 0'
expect_in "$TMP/sp.out" 'match the single-process layer'"'"'s'
s=$(spec cp 4 '' 'parallel { cp: 2 ep: 2 }')
"$LAUNCHER" --spec="$s" >"$TMP/cp.out" 2>"$TMP/cp.err" || fail "cp 2 exited $?: $(cat "$TMP/cp.err")"
expect_in "$TMP/cp.out" 'MoE layer check passed'
expect_in "$TMP/cp.out" 'match the single-process layer'"'"'s'
pass "MoE layer check under tp 2 with sequence parallelism and under cp 2"

# Against the single-process layer under ETP x EP with a gated shared expert and capacity drops, and
# expert choice with noisy gating under CP x EP, in fp32: within 1e-4.
for variant in 'etp|parallel { tp: 2 ep: 2 etp: 2 }|num_shared_experts: 1 shared_expert_gate: true router { capacity_factor: 1.0 }' \
               'ec|parallel { cp: 2 ep: 2 }|router { type: EXPERT_CHOICE capacity_factor: 1.0 noisy_gating: true }'; do
  IFS='|' read -r name parallel moe <<<"$variant"
  cat > "$TMP/$name.pbtxt" <<SPEC
name: "$name"
model { hidden_size: 32 num_heads: 4 num_layers: 2 seq_len: 64 ffn_hidden_size: 64 moe { num_experts: 8 top_k: 2 ffn_hidden_size: 32 $moe } }
$parallel
train { global_batch_size: 4 }
launch { nproc_per_node: 4 master_port: 0 rendezvous_timeout_s: 30 collective_timeout_s: 30 }
SPEC
  "$LAUNCHER" --spec="$TMP/$name.pbtxt" >"$TMP/$name.out" 2>"$TMP/$name.err" || fail "$name exited $?: $(cat "$TMP/$name.err")"
  expect_in "$TMP/$name.out" 'match the single-process layer'"'"'s'
done
pass "MoE layer check matches one process under etp 2 x ep 2 with a gated shared expert and drops, and expert choice under cp 2"

# --dry_run prints every rank's coordinates and groups.
s=$(spec dry 8 '' 'parallel { tp: 2 ep: 2 }')
"$LAUNCHER" --spec="$s" --dry_run >"$TMP/dry.out" 2>"$TMP/dry.err" || fail "dry run exited $?"
expect_in "$TMP/dry.out" 'world 8 = tp 2 × cp 1 × dp 4 × pp 1; experts: etp 2 × ep 2 × edp 2'
expect_in "$TMP/dry.out" '   5    1   0   2   0 |   1   0   1'
grep -aqE '^ep +\[0,2\] \[1,3\] \[4,6\] \[5,7\]$' "$TMP/dry.out" || fail "ep groups wrong in dry run"
grep -aqE '^edp +\[0,4\] \[1,5\] \[2,6\] \[3,7\]$' "$TMP/dry.out" || fail "edp groups wrong in dry run"
pass "--dry_run"

# Every bad spec: exit code 2, the expected fragment, no crash.
n=0
for f in "$ROOT"/tests/bad_specs/*.pbtxt; do
  want=$(head -n 1 "$f" | sed 's/^# expect: //')
  "$LAUNCHER" --spec="$f" >"$TMP/bad.out" 2>"$TMP/bad.err"
  rc=$?
  [[ $rc == 2 ]] || fail "$(basename "$f"): exit code $rc, expected 2"
  grep -aqF -- "$want" "$TMP/bad.err" || fail "$(basename "$f"): stderr lacks \"$want\": $(cat "$TMP/bad.err")"
  n=$((n + 1))
done
(( n >= 20 )) || fail "only $n bad specs"
pass "$n bad specs exit 2 naming the field"

"$LAUNCHER" --spec=/nonexistent/job.pbtxt >/dev/null 2>"$TMP/nofile.err"
[[ $? == 2 ]] || fail "missing spec: wrong exit code"
expect_in "$TMP/nofile.err" '--spec: "/nonexistent/job.pbtxt" cannot be opened (No such file or directory)'
"$LAUNCHER" --spec="$s" --frobnicate >/dev/null 2>"$TMP/flag.err"
[[ $? == 2 ]] || fail "unknown flag: wrong exit code"
expect_in "$TMP/flag.err" 'unknown argument "--frobnicate"'
"$LAUNCHER" >/dev/null 2>"$TMP/noflag.err"
[[ $? == 2 ]] || fail "no --spec: wrong exit code"
expect_in "$TMP/noflag.err" '--spec is required'
pass "missing file and bad flags exit 2"

# Under `bazel run` relative paths are the user's: BUILD_WORKING_DIRECTORY is honoured.
mkdir -p "$TMP/userdir"
cp "$(spec rel 4 '' 'parallel { ep: 2 }')" "$TMP/userdir/rel.pbtxt"
(cd / && BUILD_WORKING_DIRECTORY="$TMP/userdir" "$LAUNCHER" --spec=rel.pbtxt --dry_run >"$TMP/rel.out" 2>"$TMP/rel.err") || fail "relative spec under bazel run: $(cat "$TMP/rel.err")"
expect_in "$TMP/rel.out" 'job "rel": 4 ranks'
pass "relative --spec resolved against BUILD_WORKING_DIRECTORY"

finish
