#!/bin/bash
# Reserve CPU 1 for a benchmark on a shared 2-core machine (cgroup v1 cpuset, as root).
#
#   scripts/bench-isolate.sh on                 # every process in the root cpuset moves to CPU 0
#   scripts/bench-isolate.sh run CMD ARGS...     # CMD (and all it starts) runs on CPU 1 alone
#   scripts/bench-isolate.sh off                 # everything back, the cpusets removed
#
# Used for the 30 Nov throughput run in BENCHMARKS.md: veth softirq work runs on the sending
# CPU, so iperf3 and the data plane it exercises stay on the reserved core while builds run
# on the other. New processes inherit their parent's cpuset; a loop keeps moving stragglers.
set -eu
C=/sys/fs/cgroup/cpuset
[ -d "$C" ] || { echo "no cgroup v1 cpuset at $C" >&2; exit 1; }
case "${1:-}" in
on)
  mkdir -p "$C/rest" "$C/bench"
  echo 0 > "$C/rest/cpuset.cpus"; echo 0 > "$C/rest/cpuset.mems"
  echo 1 > "$C/bench/cpuset.cpus"; echo 0 > "$C/bench/cpuset.mems"
  ( while [ -d "$C/bench" ]; do
      for t in $(cat "$C/tasks"); do echo "$t" > "$C/rest/tasks" 2>/dev/null || true; done
      sleep 2
    done ) &
  echo $! > /run/bench-isolate.pid ;;
run)
  shift; echo $$ > "$C/bench/tasks"; exec "$@" ;;
off)
  for t in $(cat "$C/rest/tasks" "$C/bench/tasks" 2>/dev/null); do
    echo "$t" > "$C/tasks" 2>/dev/null || true
  done
  kill "$(cat /run/bench-isolate.pid 2>/dev/null)" 2>/dev/null || true
  rmdir "$C/bench" "$C/rest" ;;
*)
  echo "usage: $0 on | run CMD... | off" >&2; exit 2 ;;
esac
