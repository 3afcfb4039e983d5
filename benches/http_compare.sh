#!/usr/bin/env bash
# hello_http under `cluster --workers 2` against the same example standalone
# on a 2-thread runtime, measured with wrk in one run, rounds alternating so
# that drift on a noisy machine hits both alike. Prints medians and the ratio.
#
#   bash benches/http_compare.sh            # 5 rounds x 10 s, 32 connections
#   ROUNDS=3 DURATION=5s CONNS=256 bash benches/http_compare.sh
#
# Needs wrk (Debian: apt-get install wrk) and curl. Cleans up on exit or ^C.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
WRK_THREADS=${WRK_THREADS:-1}
WORKERS=${WORKERS:-2}

cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --examples --bin cluster

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT_CLUSTER=$(free_port)
PORT_ALONE=$(free_port)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

target/release/cluster --workers "$WORKERS" --log-level warn \
  target/release/examples/hello_http "127.0.0.1:$PORT_CLUSTER" &
pids+=($!)
HELLO_THREADS=$WORKERS target/release/examples/hello_http "127.0.0.1:$PORT_ALONE" 2>/dev/null &
pids+=($!)

for port in "$PORT_CLUSTER" "$PORT_ALONE"; do
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$port/" >/dev/null || { echo "server on $port did not start" >&2; exit 1; }
  wrk -t"$WRK_THREADS" -c"$CONNS" -d2s "http://127.0.0.1:$port/" >/dev/null   # warm-up
done

rps() { wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" "http://127.0.0.1:$1/" | awk '/Requests\/sec/ {print $2}'; }
cl=(); al=()
for r in $(seq "$ROUNDS"); do
  if (( r % 2 )); then
    cl+=("$(rps "$PORT_CLUSTER")"); al+=("$(rps "$PORT_ALONE")")
  else
    al+=("$(rps "$PORT_ALONE")"); cl+=("$(rps "$PORT_CLUSTER")")
  fi
  echo "round $r: cluster ${cl[-1]} req/s, standalone ${al[-1]} req/s" >&2
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mc=$(median "${cl[@]}"); ma=$(median "${al[@]}")
echo
echo "wrk -t$WRK_THREADS -c$CONNS -d$DURATION, $ROUNDS rounds, $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
printf '%-40s %12s %8s\n' server "median req/s" ratio
printf '%-40s %12.0f %8.3f\n' "hello_http standalone, $WORKERS threads" "$ma" 1
printf '%-40s %12.0f %8.3f\n' "hello_http, cluster --workers $WORKERS" "$mc" "$(awk -v a="$mc" -v b="$ma" 'BEGIN {print a / b}')"
