#!/usr/bin/env bash
# Job server calls against direct HTTP requests, in one run: wrk with a POST
# script calls `echo` through `cluster --workers 2 --job-server` (client ->
# watcher -> worker -> watcher -> client) and, alternating round by round,
# sends GET / to `hello_http` served directly under `cluster --workers 2`.
# Prints medians, the ratio and the calls' p50/p99 latency.
#
#   bash benches/jobserver_compare.sh           # 5 rounds x 10 s, 32 connections
#   ROUNDS=3 DURATION=5s CONNS=64 bash benches/jobserver_compare.sh
#
# Needs wrk (Debian: apt-get install wrk) and curl. Cleans up on exit or ^C.
set -euo pipefail

ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
WRK_THREADS=${WRK_THREADS:-1}
WORKERS=${WORKERS:-2}
# Calls a worker runs at once: enough that every connection has one in flight.
CONCURRENCY=${CONCURRENCY:-$(( (CONNS + WORKERS - 1) / WORKERS ))}

cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --examples --bin cluster

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT_HTTP=$(free_port)
PORT_JOBS=$(free_port)
pids=()
tmp=$(mktemp -d)
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$tmp"
}
trap cleanup EXIT INT TERM

cat >"$tmp/post.lua" <<'LUA'
wrk.method = "POST"
wrk.body = '{"n": 1, "text": "hello"}'
wrk.headers["Content-Type"] = "application/json"
LUA

target/release/cluster --workers "$WORKERS" --log-level warn \
  target/release/examples/hello_http "127.0.0.1:$PORT_HTTP" &
pids+=($!)
target/release/cluster --workers "$WORKERS" --log-level warn --job-concurrency "$CONCURRENCY" \
  --job-server "127.0.0.1:$PORT_JOBS" target/release/examples/jobs &
pids+=($!)

CALL_URL="http://127.0.0.1:$PORT_JOBS/v1/call/echo"
HTTP_URL="http://127.0.0.1:$PORT_HTTP/"
for _ in $(seq 100); do curl -fs "$HTTP_URL" >/dev/null && curl -fs "http://127.0.0.1:$PORT_JOBS/v1/health" >/dev/null && break; sleep 0.1; done
curl -fs -X POST -d '1' "$CALL_URL" >/dev/null || { echo "the job server did not start" >&2; exit 1; }
wrk -t"$WRK_THREADS" -c"$CONNS" -d2s "$HTTP_URL" >/dev/null
wrk -t"$WRK_THREADS" -c"$CONNS" -d2s -s "$tmp/post.lua" "$CALL_URL" >/dev/null

calls() {
  wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" --latency -s "$tmp/post.lua" "$CALL_URL" >"$tmp/calls.txt"
  grep -q 'Non-2xx' "$tmp/calls.txt" && { echo "calls failed:" >&2; cat "$tmp/calls.txt" >&2; exit 1; }
  awk '/Requests\/sec/ {print $2}' "$tmp/calls.txt"
}
direct() { wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" "$HTTP_URL" | awk '/Requests\/sec/ {print $2}'; }
to_us() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); print v} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v*1000} else {sub(/s$/,"",v); print v*1000000}}'; }
ca=(); di=(); p50=(); p99=()
for r in $(seq "$ROUNDS"); do
  if (( r % 2 )); then
    ca+=("$(calls)"); di+=("$(direct)")
  else
    di+=("$(direct)"); ca+=("$(calls)")
  fi
  p50+=("$(awk '$1=="50%" {print $2}' "$tmp/calls.txt" | to_us)")
  p99+=("$(awk '$1=="99%" {print $2}' "$tmp/calls.txt" | to_us)")
  echo "round $r: calls ${ca[-1]}/s (p50 ${p50[-1]} us, p99 ${p99[-1]} us), direct ${di[-1]} req/s" >&2
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
mc=$(median "${ca[@]}"); md=$(median "${di[@]}")
echo
echo "wrk -t$WRK_THREADS -c$CONNS -d$DURATION, $ROUNDS rounds, --workers $WORKERS --job-concurrency $CONCURRENCY, $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
printf '%-52s %12s %8s\n' what "median /s" ratio
printf '%-52s %12s %8s\n' "hello_http GET / under cluster (direct)" "$md" "1.00"
printf '%-52s %12s %8.2f\n' "POST /v1/call/echo through the job server" "$mc" "$(echo "$mc / $md" | bc -l)"
echo "call latency: p50 $(median "${p50[@]}") us, p99 $(median "${p99[@]}") us (medians over rounds)"
