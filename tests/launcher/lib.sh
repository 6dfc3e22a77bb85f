# Helpers for the launcher's process tests (sourced by *_test.sh).
set -uo pipefail

LAUNCHER="${TEST_SRCDIR}/${TEST_WORKSPACE}/launcher/launcher"
TMP="${TEST_TMPDIR:-$(mktemp -d)}"
PASSED=0

fail() {
  echo "FAIL: $*" >&2
  for f in "$TMP"/*.out "$TMP"/*.err; do
    [[ -s "$f" ]] && { echo "--- $f" >&2; tail -n 20 "$f" >&2; }
  done
  exit 1
}
pass() { PASSED=$((PASSED + 1)); echo "ok: $*"; }
now_ms() { echo $(( $(date +%s%N) / 1000000 )); }

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# expect_in FILE FRAGMENT
expect_in() { grep -aqF -- "$2" "$1" || fail "$1 lacks: $2"; }

# wait_for FILE FRAGMENT SECONDS
wait_for() {
  local deadline=$(( $(now_ms) + $3 * 1000 ))
  while ! grep -aqF -- "$2" "$1" 2>/dev/null; do
    (( $(now_ms) < deadline )) || fail "timed out waiting for \"$2\" in $1"
    sleep 0.05
  done
}

# spec NAME NPROC [LAUNCH_FIELDS] [OTHER_SECTIONS]: writes $TMP/NAME.pbtxt, prints its path.
# Text format allows each section once, so launch fields are merged here.
spec() {
  local name=$1 nproc=$2 launch=${3:-} other=${4:-}
  [[ "$launch" == *master_port* ]] || launch="$launch master_port: 0"
  [[ "$launch" == *collective_timeout_s* ]] || launch="$launch collective_timeout_s: 30"
  cat > "$TMP/$name.pbtxt" <<SPEC
name: "$name"
model { hidden_size: 32 num_heads: 4 num_layers: 2 ffn_hidden_size: 64 moe { num_experts: 4 top_k: 2 ffn_hidden_size: 32 } }
train { global_batch_size: 12 }
launch { nproc_per_node: $nproc rendezvous_timeout_s: 30 $launch }
$other
SPEC
  echo "$TMP/$name.pbtxt"
}

# run_with_fault NAME FAULT SPEC: runs a launcher to its end with SWITCHYARD_FAULT=FAULT, its
# output in $TMP/NAME.out and .err; sets RC (its exit code) and DT (milliseconds it took).
run_with_fault() {
  local t0
  t0=$(now_ms)
  SWITCHYARD_FAULT=$2 "$LAUNCHER" --spec="$3" >"$TMP/$1.out" 2>"$TMP/$1.err"
  RC=$?
  DT=$(( $(now_ms) - t0 ))
}

# The pids a launcher started, from its "[launcher] rank R: pid P" lines.
worker_pids() { sed -n 's/^\[launcher\] rank [0-9]*: pid \([0-9]*\)$/\1/p' "$1"; }

# start_sleeping NAME SPEC: starts a launcher in the background whose workers sleep after the
# cluster and MoE layer checks, and waits for those (their last line: after it no worker is in
# a collective). Sets LPID (the launcher) and PIDS (its workers).
start_sleeping() {
  SWITCHYARD_FAULT=sleep:120 "$LAUNCHER" --spec="$2" >"$TMP/$1.out" 2>"$TMP/$1.err" &
  LPID=$!
  wait_for "$TMP/$1.out" 'checks the cluster and its MoE layer only' 60
  mapfile -t PIDS < <(worker_pids "$TMP/$1.out")
}

assert_gone() {
  local pid
  for pid in "$@"; do
    if kill -0 "$pid" 2>/dev/null && [[ "$(ps -o stat= -p "$pid" | tr -d ' ')" != Z* ]]; then
      fail "worker pid $pid is still alive"
    fi
  done
}

finish() { echo "$PASSED passed, 0 failed"; }
