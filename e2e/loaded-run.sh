#!/usr/bin/env bash
# The suites on a loaded machine (docs/testing.md, "Under load"): `pytest tests` TESTS times
# in a row in one stream and `pytest e2e` E2E times in another, both at once, with two busy
# loops on the cores all along. Run it from a clone of its own (its own .venv, after `make
# venv`), not from a checkout in use. Writes LOGDIR/summary.log (one line a run), each run's
# output and JUnit XML, and the load average each minute; stops by itself.
#
#     bash e2e/loaded-run.sh [LOGDIR] [TESTS] [E2E]     # defaults: ./loaded-run 5 3
set -u
cd "$(dirname "$0")/.."
logs=$(mkdir -p "${1:-loaded-run}" && cd "${1:-loaded-run}" && pwd)
tests_runs=${2:-5}
e2e_runs=${3:-3}
export PATH=$PWD/.venv/bin:$PATH

bash e2e/build-binaries.sh >/dev/null   # the control plane first: the loops only after
loops=()
for _ in 1 2; do (while :; do :; done) & loops+=($!); done
(while :; do echo "$(date +%T) $(cut -d' ' -f1-3 /proc/loadavg)"; sleep 60; done) >"$logs/load.log" &
loops+=($!)
trap 'kill "${loops[@]}" 2>/dev/null' EXIT
echo "$(date +%T) start at $(git rev-parse --short HEAD)" >>"$logs/summary.log"

stream() {  # NAME COUNT COMMAND...
  local name=$1 count=$2 i t0 rc
  shift 2
  for i in $(seq 1 "$count"); do
    t0=$(date +%s)
    "$@" -q -rfE -p no:cacheprovider --junitxml="$logs/$name-$i.xml" >"$logs/$name-$i.log" 2>&1
    rc=$?
    echo "$(date +%T) $name run $i rc=$rc $(( ($(date +%s) - t0) / 60 ))m: $(tail -1 "$logs/$name-$i.log")" \
      >>"$logs/summary.log"
  done
}
# Started in the background, each stream's commands have SIGINT ignored (a non-interactive
# shell's rule); the suites' Ctrl-C tests start their children as a terminal does.
stream tests "$tests_runs" pytest tests &
unit=$!
(bash e2e/build-binaries.sh prometheus keda metrics-server >/dev/null && stream e2e "$e2e_runs" pytest e2e) &
e2e=$!
wait "$unit" "$e2e"
echo "$(date +%T) done" >>"$logs/summary.log"
