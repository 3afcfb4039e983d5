#!/usr/bin/env bash
# hello_http under `cluster --workers 2` in each --balance mode against
# `shared`, with wrk at 32 and 256 connections, rounds alternating between
# modes; then the spread of keep-alive connections over the workers in each
# mode (max/min of connections per worker over 64 held connections).
#
#   bash benches/balance_compare.sh
#   ROUNDS=3 DURATION=5s bash benches/balance_compare.sh
#
# Needs wrk (Debian: apt-get install wrk), curl, python3. Cleans up on exit.
set -euo pipefail
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5s}
MODES=${MODES:-"shared reuseport round-robin least-connections ip-hash"}
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "wrk not found: apt-get install wrk" >&2; exit 1; }
cargo build --release --quiet --examples --bin cluster
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
declare -A port pid
cleanup() {
  for m in "${!pid[@]}"; do kill -TERM "${pid[$m]}" 2>/dev/null || true; done
  sleep 0.5
  for m in "${!pid[@]}"; do kill -KILL "${pid[$m]}" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM
for m in $MODES; do
  port[$m]=$(free_port)
  target/release/cluster --workers 2 --balance "$m" --log-level warn \
    target/release/examples/hello_http "127.0.0.1:${port[$m]}" &
  pid[$m]=$!
done
for m in $MODES; do
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:${port[$m]}/" >/dev/null && break; sleep 0.1; done
  wrk -t1 -c32 -d1s "http://127.0.0.1:${port[$m]}/" >/dev/null
done
rps() { wrk -t1 -c"$2" -d"$DURATION" "http://127.0.0.1:${port[$1]}/" | awk '/Requests\/sec/ {print $2}'; }
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo "hello_http, cluster --workers 2, wrk -t1 -d$DURATION, $ROUNDS rounds, $(nproc) cores"
printf '%-20s %6s %12s %8s\n' mode conns "median rps" "vs shared"
for conns in 32 256; do
  declare -A res=()
  for r in $(seq "$ROUNDS"); do
    order=$MODES
    (( r % 2 )) || order=$(echo "$MODES" | tr ' ' '\n' | tac | tr '\n' ' ')
    for m in $order; do res[$m]="${res[$m]:-} $(rps "$m" "$conns")"; done
  done
  base=$(median ${res[shared]})
  for m in $MODES; do
    med=$(median ${res[$m]})
    printf '%-20s %6s %12.0f %8.3f\n' "$m" "$conns" "$med" "$(awk -v a="$med" -v b="$base" 'BEGIN {print a / b}')"
  done
  unset res
done
echo
echo "spread of 64 held keep-alive connections over 2 workers (max/min per worker):"
for m in $MODES; do
  python3 - "${port[$m]}" "$m" <<'PY'
import socket, sys, collections
port, mode = int(sys.argv[1]), sys.argv[2]
conns, per = [], collections.Counter()
for _ in range(64):
    s = socket.create_connection(("127.0.0.1", port)); s.settimeout(5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while b"Hello, World!" not in data:
        data += s.recv(4096)
    wid = [l.split(b":")[1].strip() for l in data.split(b"\r\n") if l.lower().startswith(b"x-worker-id")][0]
    per[wid] += 1; conns.append(s)
counts = sorted(per.values())
ratio = counts[-1] / counts[0] if len(counts) == 2 else float("inf")
print(f"  {mode:<20} {dict((k.decode(), v) for k, v in per.items())}  max/min {ratio:.2f}")
PY
done
