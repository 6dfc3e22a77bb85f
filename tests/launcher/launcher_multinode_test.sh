#!/usr/bin/env bash
# Two launchers on loopback as two nodes; a failure on one node stops the other; workers
# started by torchrun-, Slurm- and mpirun-style variables run in place.
source "${TEST_SRCDIR}/${TEST_WORKSPACE}/tests/launcher/lib.sh"

two_node_spec() {  # NAME PORT NODE_RANK
  spec "$1" 2 "nnodes: 2 node_rank: $3 master_port: $2" 'parallel { ep: 2 }'
}

restart_spec() { spec "$1" 2 "nnodes: 2 node_rank: $3 master_port: $2 max_restarts: 1" 'parallel { ep: 2 }'; }

# start_nodes NAME MAKE_SPEC FAULT: launchers for nodes 0 and 1 in the background on a fresh
# port; output in $TMP/NAME{0,1}.{out,err}; sets L0 and L1.
start_nodes() {
  local name=$1 make=$2 fault=$3 port
  port=$(free_port)
  SWITCHYARD_FAULT=$fault "$LAUNCHER" --spec="$($make "${name}0" "$port" 0)" >"$TMP/${name}0.out" 2>"$TMP/${name}0.err" &
  L0=$!
  SWITCHYARD_FAULT=$fault "$LAUNCHER" --spec="$($make "${name}1" "$port" 1)" >"$TMP/${name}1.out" 2>"$TMP/${name}1.err" &
  L1=$!
}

# signal_and_wait SIG PID: sends SIG to PID, then waits for both launchers; sets RC0, RC1
# and DT (ms from the signal until both had exited).
signal_and_wait() {
  local t0
  t0=$(now_ms)
  kill "-$1" "$2"
  wait "$L1"; RC1=$?
  wait "$L0"; RC0=$?
  DT=$(( $(now_ms) - t0 ))
}

# Two nodes × 2 ranks = a world of 4.
start_nodes n two_node_spec ''
wait "$L0" || fail "node 0 launcher exited $?"
wait "$L1" || fail "node 1 launcher exited $?"
expect_in "$TMP/n0.out" 'job "n0": 4 ranks'
expect_in "$TMP/n0.out" 'sum of rank+1 = 10, expected 10'
expect_in "$TMP/n0.out" 'experts etp 1 × ep 2 × edp 2'
expect_in "$TMP/n1.out" 'starting ranks 2-3 of 4'
expect_in "$TMP/n1.out" '[launcher] node 1: all 2 workers finished'
pass "two launchers form a world of 4"

# A worker killed on node 1 stops node 0 too.
start_nodes k two_node_spec sleep:120
wait_for "$TMP/k0.out" 'checks the cluster and its MoE layer only' 60
mapfile -t p0 < <(worker_pids "$TMP/k0.out")
mapfile -t p1 < <(worker_pids "$TMP/k1.out")
signal_and_wait KILL "${p1[1]}"
(( RC1 != 0 && RC0 != 0 )) || fail "exit codes node0=$RC0 node1=$RC1"
(( DT <= 5000 )) || fail "stopping both nodes took ${DT} ms"
expect_in "$TMP/k1.err" "rank 3 (pid ${p1[1]}, node 1) was killed by signal 9 (SIGKILL)"
expect_in "$TMP/k0.err" "another node failed: node 1: rank 3"
assert_gone "${p0[@]}" "${p1[@]}"
pass "a death on node 1 stops both nodes in ${DT} ms"

# A failure on node 1 in the first attempt: both nodes restart together and succeed.
start_nodes r restart_spec exit:3:5:0
wait "$L0" || fail "restart: node 0 exited $?"
wait "$L1" || fail "restart: node 1 exited $?"
expect_in "$TMP/r1.err" 'rank 3 (pid'
expect_in "$TMP/r1.err" 'exited with code 5; stopped all workers; restarting them (restart 1 of 1)'
expect_in "$TMP/r0.err" 'another node failed: node 1: rank 3'
expect_in "$TMP/r0.err" 'restarting them (restart 1 of 1)'
expect_in "$TMP/r0.out" 'cluster check passed (after 1 restart)'
pass "both nodes restart together after a failure on node 1"

# Ctrl-C on node 1: node 0 stops too, and neither restarts.
start_nodes i restart_spec sleep:120
wait_for "$TMP/i0.out" 'checks the cluster and its MoE layer only' 60
mapfile -t p0 < <(worker_pids "$TMP/i0.out")
signal_and_wait INT "$L1"
(( RC1 == 130 )) || fail "interrupted node 1: exit code $RC1"
(( RC0 == 1 )) || fail "node 0 after node 1's Ctrl-C: exit code $RC0"
(( DT <= 5000 )) || fail "stopping took ${DT} ms"
expect_in "$TMP/i0.err" 'another node failed: node 1: interrupted by SIGINT'
! grep -aq restarting "$TMP/i0.err" "$TMP/i1.err" || fail "restarted after Ctrl-C"
assert_gone "${p0[@]}"
pass "Ctrl-C on node 1 stops node 0 in ${DT} ms, no restart"

# Port 0 cannot work when an outer launcher started the ranks.
RANK=0 WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=0 "$LAUNCHER" --spec="$(spec p0 1 '' 'parallel { ep: 2 }')" >/dev/null 2>"$TMP/p0.err"
[[ $? == 1 ]] || fail "port 0 in place: wrong exit code"
expect_in "$TMP/p0.err" 'is 0, but ranks started by torchrun cannot learn a port picked at random'
pass "port 0 under an outer launcher is a clear error"

# In place: two processes started the way torchrun, srun and mpirun start them.
s=$(spec inplace 1 '' 'parallel { ep: 2 }')
run_pair() {  # LABEL then, for each of 2 ranks, the variable assignments via a function
  local label=$1 port; port=$(free_port)
  for r in 0 1; do
    env $("$2" "$r") MASTER_ADDR=127.0.0.1 MASTER_PORT="$port" "$LAUNCHER" --spec="$s" \
      >"$TMP/$label$r.out" 2>"$TMP/$label$r.err" &
    eval "pid$r=\$!"
  done
  wait "$pid0" || fail "$label rank 0 exited $?"
  wait "$pid1" || fail "$label rank 1 exited $?"
  expect_in "$TMP/${label}0.out" "2 ranks (started by $label)"
  expect_in "$TMP/${label}0.out" 'sum of rank+1 = 3, expected 3'
  pass "started by $label"
}
torchrun_vars() { echo "RANK=$1 WORLD_SIZE=2 LOCAL_RANK=$1 LOCAL_WORLD_SIZE=2"; }
slurm_vars() { echo "SLURM_PROCID=$1 SLURM_NTASKS=2 SLURM_LOCALID=$1 SLURM_STEP_ID=0 SLURM_STEP_TASKS_PER_NODE=2"; }
mpirun_vars() { echo "OMPI_COMM_WORLD_RANK=$1 OMPI_COMM_WORLD_SIZE=2 OMPI_COMM_WORLD_LOCAL_RANK=$1 OMPI_COMM_WORLD_LOCAL_SIZE=2"; }
run_pair torchrun torchrun_vars
run_pair slurm slurm_vars
run_pair mpirun mpirun_vars

# The world an outer launcher gives must fit the spec's layout.
RANK=0 WORLD_SIZE=3 MASTER_PORT=1 "$LAUNCHER" --spec="$s" >/dev/null 2>"$TMP/mismatch.err"
[[ $? == 2 ]] || fail "world mismatch: wrong exit code"
expect_in "$TMP/mismatch.err" 'parallel.ep: etp × ep = 1 × 2 = 2 does not divide tp × cp × dp = 1 × 1 × 3 = 3'
pass "outer world size checked against the layout"

finish
