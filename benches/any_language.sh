#!/usr/bin/env bash
# The README's Python and Node examples (examples/python/server.py,
# examples/node/server.js) under `cluster --workers 2 --listen` against the
# same server run as one process, and the Node one against PM2's cluster
# mode (`pm2 start -i 2`), measured with wrk in one run, rounds alternating
# so that drift on a noisy machine hits every server alike. Prints medians
# and ratios.
#
#   bash benches/any_language.sh              # 3 rounds x 10 s, 32 connections
#   ROUNDS=5 DURATION=5s CONNS=64 bash benches/any_language.sh
#
# Needs wrk, curl, python3, node and npm (PM2 is installed with npm into
# target/pm2 on first use). Cleans up on exit or ^C.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-32}
WRK_THREADS=${WRK_THREADS:-1}
WORKERS=${WORKERS:-2}

cd "$(dirname "$0")/.."
for tool in wrk curl python3 node npm; do
  command -v "$tool" >/dev/null || { echo "$tool not found" >&2; exit 1; }
done
cargo build --release --quiet --bin cluster
PM2_DIR=target/pm2
[ -x "$PM2_DIR/node_modules/.bin/pm2" ] || npm install --silent --prefix "$PM2_DIR" pm2 >/dev/null
PM2="$PM2_DIR/node_modules/.bin/pm2"
export PM2_HOME
PM2_HOME=$(mktemp -d)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
pids=()
cleanup() {
  "$PM2" kill >/dev/null 2>&1 || true
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for _ in $(seq 50); do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    (( alive )) || break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$PM2_HOME"
}
trap cleanup EXIT INT TERM

names=(); ports=()
start() { # name, port, command...
  local name=$1 port=$2; shift 2
  "$@" >/dev/null 2>&1 &
  pids+=($!)
  names+=("$name"); ports+=("$port")
}
P=$(free_port); start "python, one process" "$P" python3 examples/python/server.py "127.0.0.1:$P"
P=$(free_port); start "python, cluster --workers $WORKERS --listen" "$P" \
  target/release/cluster --workers "$WORKERS" --log-level warn --notify --listen "127.0.0.1:$P" \
  python3 examples/python/server.py
P=$(free_port); start "node, one process" "$P" node examples/node/server.js "127.0.0.1:$P"
P=$(free_port); start "node, cluster --workers $WORKERS --listen" "$P" \
  target/release/cluster --workers "$WORKERS" --log-level warn --listen "127.0.0.1:$P" \
  node examples/node/server.js
P=$(free_port)
"$PM2" start examples/node/server.js -i "$WORKERS" --name bench -- "127.0.0.1:$P" >/dev/null
names+=("node, pm2 start -i $WORKERS"); ports+=("$P")

for port in "${ports[@]}"; do
  for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/" >/dev/null && break; sleep 0.1; done
  curl -fs "http://127.0.0.1:$port/" >/dev/null || { echo "server on $port did not start" >&2; exit 1; }
  wrk -t"$WRK_THREADS" -c"$CONNS" -d2s "http://127.0.0.1:$port/" >/dev/null   # warm-up
done

rps() { wrk -t"$WRK_THREADS" -c"$CONNS" -d"$DURATION" "http://127.0.0.1:$1/" | awk '/Requests\/sec/ {print $2}'; }
declare -A got
n=${#ports[@]}
for r in $(seq "$ROUNDS"); do
  for k in $(seq 0 $((n - 1))); do
    i=$(( (k + r) % n ))   # a different order every round
    v=$(rps "${ports[$i]}")
    got[$i]="${got[$i]:-} $v"
    echo "round $r: ${names[$i]}: $v req/s" >&2
  done
done

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
echo
echo "wrk -t$WRK_THREADS -c$CONNS -d$DURATION, $ROUNDS rounds, $(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
printf '%-44s %12s %s\n' server "median req/s" "ratio"
m=()
for i in $(seq 0 $((n - 1))); do
  # shellcheck disable=SC2086
  m[$i]=$(median ${got[$i]})
done
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
printf '%-44s %12s %s\n' "${names[0]}" "${m[0]}" "1.00"
printf '%-44s %12s %s\n' "${names[1]}" "${m[1]}" "$(ratio "${m[1]}" "${m[0]}") x python one process"
printf '%-44s %12s %s\n' "${names[2]}" "${m[2]}" "1.00"
printf '%-44s %12s %s\n' "${names[3]}" "${m[3]}" "$(ratio "${m[3]}" "${m[2]}") x node one process, $(ratio "${m[3]}" "${m[4]}") x pm2"
printf '%-44s %12s %s\n' "${names[4]}" "${m[4]}" "$(ratio "${m[4]}" "${m[2]}") x node one process"
