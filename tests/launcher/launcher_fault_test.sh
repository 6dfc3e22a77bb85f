#!/usr/bin/env bash
# Supervision: a dead worker, a failing worker, a hung collective, Ctrl-C and a busy port.
source "${TEST_SRCDIR}/${TEST_WORKSPACE}/tests/launcher/lib.sh"

# SIGKILL one worker: the launcher exits non-zero within 5 s, names the rank, leaves nothing.
start_sleeping kill "$(spec kill 3)"
(( ${#PIDS[@]} == 3 )) || fail "expected 3 worker pids, got ${#PIDS[@]}"
t0=$(now_ms)
kill -KILL "${PIDS[1]}"
wait "$LPID"
rc=$?
dt=$(( $(now_ms) - t0 ))
(( rc != 0 )) || fail "launcher exited 0 after a worker was killed"
(( dt <= 5000 )) || fail "launcher took ${dt} ms to stop (limit 5000)"
expect_in "$TMP/kill.err" "rank 1 (pid ${PIDS[1]}, node 0) was killed by signal 9 (SIGKILL)"
assert_gone "${PIDS[@]}"
pass "SIGKILL of rank 1: launcher exit $rc after ${dt} ms, no worker left"

# A worker that exits non-zero.
s=$(spec exit 2)
SWITCHYARD_FAULT=exit:1:3 "$LAUNCHER" --spec="$s" >"$TMP/exit.out" 2>"$TMP/exit.err"
rc=$?
(( rc == 1 )) || fail "worker exit: launcher exit code $rc, expected 1"
expect_in "$TMP/exit.err" 'rank 1 (pid'
expect_in "$TMP/exit.err" 'exited with code 3'
pass "worker exit code 3 reported"

# A NaN in one rank's hidden states in the MoE layer check: every rank stops at once with a
# clear error (the layer's agreement over the stage), none waits for the collective timeout.
run_with_fault nan nan:2 "$(spec nan 4 'collective_timeout_s: 60' 'parallel { ep: 2 }')"
(( RC == 1 )) || fail "NaN in the layer check: launcher exit code $RC, expected 1"
(( DT < 30000 )) || fail "NaN in the layer check took ${DT} ms"
expect_in "$TMP/nan.err" '[rank 2] error: MoE layer check of layers.0.mlp failed: router: hidden states hold NaN or inf'
grep -aqE '^\[rank [013]\] error: MoE layer check of layers.0.mlp failed: router: another rank stopped before routing' "$TMP/nan.err" ||
  fail "no other rank named the failure: $(cat "$TMP/nan.err")"
mapfile -t pids < <(worker_pids "$TMP/nan.out")
assert_gone "${pids[@]}"
pass "a NaN on rank 2 in the MoE layer check stops the job in ${DT} ms with a clear error"

# One rank's expert weights off by 1e-2: the check against the single-process layer names
# what differs (the output, on every rank whose tokens that expert got), and the job fails.
run_with_fault skew skew:1 "$(spec skew 4 '' 'parallel { ep: 2 }')"
(( RC == 1 )) || fail "skewed weights: launcher exit code $RC, expected 1"
grep -aqE "^\[rank 1\] error: MoE layer check of layers.0.mlp failed: .* differs from the single-process layer's: relative error" "$TMP/skew.err" ||
  fail "rank 1 did not name the difference: $(cat "$TMP/skew.err")"
pass "weights that differ from the single-process layer fail the MoE layer check"

# Inf expert weights on rank 1: the ranks whose tokens reach that expert find inf, the others
# do not; they agree before the reference step (whose collectives would otherwise wait for the
# ranks that stopped until the timeout), and the job fails at once.
run_with_fault inf inf:1 "$(spec inf 4 'collective_timeout_s: 60' 'parallel { ep: 2 }')"
(( RC == 1 )) || fail "inf weights: launcher exit code $RC, expected 1"
(( DT < 30000 )) || fail "inf weights took ${DT} ms"
expect_in "$TMP/inf.err" 'holds NaN or inf'
expect_in "$TMP/inf.err" 'other rank(s) found NaN or inf (see their errors)'
pass "inf weights on rank 1 fail the MoE layer check in ${DT} ms"

# A rank that never reaches the collective: the others time out with a clear error.
run_with_fault hang hang:1 "$(spec hang 2 'collective_timeout_s: 3')"
(( RC == 1 )) || fail "hung collective: launcher exit code $RC"
(( DT < 20000 )) || fail "hung collective took ${DT} ms"
expect_in "$TMP/hang.err" '[rank 0] error: group world, member 0 of 2 (global rank 0): barrier timed out'
expect_in "$TMP/hang.err" 'rank 0 (pid'
mapfile -t pids < <(worker_pids "$TMP/hang.out")
assert_gone "${pids[@]}"
pass "hung collective times out after ${DT} ms"

# Ctrl-C (SIGINT to the launcher): every worker stops, exit code 130.
start_sleeping int "$(spec int 2)"
t0=$(now_ms)
kill -INT "$LPID"
wait "$LPID"
rc=$?
dt=$(( $(now_ms) - t0 ))
(( rc == 130 )) || fail "SIGINT: exit code $rc, expected 130"
(( dt <= 5000 )) || fail "SIGINT: took ${dt} ms"
expect_in "$TMP/int.err" 'interrupted by SIGINT'
assert_gone "${PIDS[@]}"
pass "Ctrl-C stops all workers in ${dt} ms"

# A busy port.
port=$(free_port)
python3 -c 'import socket,sys,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(); print("listening", flush=True); time.sleep(60)' "$port" >"$TMP/holder.out" &
holder=$!
wait_for "$TMP/holder.out" listening 10
s=$(spec busy 2 "master_port: $port")
"$LAUNCHER" --spec="$s" >"$TMP/busy.out" 2>"$TMP/busy.err"
rc=$?
kill "$holder"
(( rc == 1 )) || fail "busy port: exit code $rc"
expect_in "$TMP/busy.err" "the port is already in use"
expect_in "$TMP/busy.err" "launch.master_port"
! grep -aq 'rank 0: pid' "$TMP/busy.out" || fail "workers were started on a busy port"
pass "busy port is a clear error"

# A worker that dies leaves a helper process behind: the launcher stops that too.
s=$(spec orphan 2)
SWITCHYARD_FAULT=orphan:1 "$LAUNCHER" --spec="$s" >"$TMP/orphan.out" 2>"$TMP/orphan.err"
rc=$?
(( rc == 1 )) || fail "orphan: exit code $rc"
helper=$(sed -n 's/.*started helper pid \([0-9]*\).*/\1/p' "$TMP/orphan.err")
[[ -n "$helper" ]] || fail "no helper pid reported"
expect_in "$TMP/orphan.err" 'exited with code 7'
assert_gone "$helper"
pass "a failed worker's helper process is stopped too"

# SIGTERM to the launcher and its workers at once (as scancel or systemd send it): an
# interruption, not a failure to restart from; exit code 128 + 15.
start_sleeping term "$(spec term 2 'max_restarts: 3')"
kill -TERM "$LPID" "${PIDS[@]}"
wait "$LPID"
rc=$?
(( rc == 143 )) || fail "SIGTERM: exit code $rc, expected 143"
expect_in "$TMP/term.err" 'interrupted by SIGTERM'
! grep -aq restarting "$TMP/term.err" || fail "restarted after SIGTERM"
assert_gone "${PIDS[@]}"
pass "SIGTERM to the whole job is an interruption (exit 143, no restart)"

# launch.max_restarts: a failure in the first attempt only is recovered by one restart.
s=$(spec restart 2 'max_restarts: 1')
SWITCHYARD_FAULT=exit:1:3:0 "$LAUNCHER" --spec="$s" >"$TMP/restart.out" 2>"$TMP/restart.err"
rc=$?
(( rc == 0 )) || fail "restart: exit code $rc, expected 0"
expect_in "$TMP/restart.err" 'exited with code 3; stopped all workers; restarting them (restart 1 of 1)'
expect_in "$TMP/restart.out" 'cluster check passed (after 1 restart)'
(( $(worker_pids "$TMP/restart.out" | wc -l) == 4 )) || fail "expected 2 × 2 worker starts"
pass "one restart recovers a failure of the first attempt"

# A failure in every attempt: gives up after max_restarts, exit 1.
s=$(spec giveup 2 'max_restarts: 2')
SWITCHYARD_FAULT=exit:0:4 "$LAUNCHER" --spec="$s" >"$TMP/giveup.out" 2>"$TMP/giveup.err"
rc=$?
(( rc == 1 )) || fail "give up: exit code $rc, expected 1"
expect_in "$TMP/giveup.err" 'restarting them (restart 2 of 2)'
expect_in "$TMP/giveup.err" 'exited with code 4; stopped all workers (gave up after 2 restarts, launch.max_restarts)'
(( $(worker_pids "$TMP/giveup.out" | wc -l) == 6 )) || fail "expected 3 × 2 worker starts"
pass "gives up after launch.max_restarts"

finish
