#!/usr/bin/env bash
# wrk against hello_http under `cluster --workers 2` while the watcher does
# RELOADS rolling restarts (one every PAUSE seconds, each awaited with
# `cluster reload`), against the same window with no reload, for keep-alive
# and `Connection: close` clients. Then times one rolling restart of 4 workers.
#
#   bash benches/reload_under_load.sh
#   RELOADS=10 PAUSE=1 CONNS=32 bash benches/reload_under_load.sh
#
# Needs wrk (Debian: apt-get install wrk) and curl. Cleans up on exit or ^C.
set -euo pipefail

RELOADS=${RELOADS:-10}
PAUSE=${PAUSE:-1}
CONNS=${CONNS:-32}
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --examples --bin cluster

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_cluster() { # workers port pidfile
  target/release/cluster --workers "$1" --log-level warn --pid-file "$3" \
    target/release/examples/hello_http "127.0.0.1:$2" 2>>"$work/cluster.log" &
  pids+=($!)
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$2/" >/dev/null && return; sleep 0.1; done
  echo "cluster on $2 did not start" >&2; exit 1
}

port=$(free_port)
start_cluster 2 "$port" "$work/a.pid"
duration=$(( RELOADS * (PAUSE + 1) + 2 ))
wrk -t1 -c"$CONNS" -d1s "http://127.0.0.1:$port/" >/dev/null   # warm-up

run_wrk() { # label extra-header reload?
  local out="$work/wrk.txt" header=()
  [ -n "$2" ] && header=(-H "$2")
  wrk -t1 -c"$CONNS" -d"${duration}s" "${header[@]}" "http://127.0.0.1:$port/" >"$out" &
  local wrk_pid=$!
  local reloads=0 failed_reloads=0
  if [ "$3" = yes ]; then
    sleep 1
    for _ in $(seq "$RELOADS"); do
      if target/release/cluster reload --pid-file "$work/a.pid" >/dev/null; then reloads=$((reloads+1)); else failed_reloads=$((failed_reloads+1)); fi
      sleep "$PAUSE"
    done
  fi
  wait "$wrk_pid"
  local rps errors non2xx total
  rps=$(awk '/Requests\/sec/ {print $2}' "$out")
  total=$(awk '/requests in/ {print $1}' "$out")
  errors=$(awk '/Socket errors/ {gsub(",",""); print $4+$6+$8+$10}' "$out"); errors=${errors:-0}
  non2xx=$(awk '/Non-2xx/ {print $5}' "$out"); non2xx=${non2xx:-0}
  printf '%-34s %10s %12s %14s %10s %8s\n' "$1" "$rps" "$total" "$errors" "$non2xx" "$reloads/$RELOADS"
}

echo "hello_http, cluster --workers 2, wrk -t1 -c$CONNS -d${duration}s; $RELOADS reloads one every ~${PAUSE}s"
printf '%-34s %10s %12s %14s %10s %8s\n' run req/s requests socket-errors non-2xx reloads
run_wrk "keep-alive, no reload" "" no
run_wrk "keep-alive, reloading" "" yes
run_wrk "Connection: close, no reload" "Connection: close" no
run_wrk "Connection: close, reloading" "Connection: close" yes

# Time of one rolling restart of 4 workers (median of 5).
port4=$(free_port)
start_cluster 4 "$port4" "$work/b.pid"
times=()
for _ in 1 2 3 4 5; do
  t0=$(date +%s.%N)
  target/release/cluster reload --pid-file "$work/b.pid" >/dev/null
  t1=$(date +%s.%N)
  times+=("$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.3f", b - a}')")
done
echo
echo "rolling restart of 4 idle workers (cluster reload, 5 runs): ${times[*]} s; median $(printf '%s\n' "${times[@]}" | sort -g | sed -n 3p) s"
