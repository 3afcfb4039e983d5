#!/usr/bin/env bash
# Each path of issue 17 beside the machine's limit for it, measured in the
# same run: a small C program does the same work with plain system calls
# (no runtime, no encoding) right before the project's bench.
#
#   bash benches/limits/run.sh            # every row (~3 min on 2 cores)
#   ONLY=rss bash benches/limits/run.sh   # one row: messages, handoff, logs, rss, status
#
# Rows:
#   messages  seqpacket_rtt.c            vs cargo bench --bench messages
#   handoff   fd_pass.c                  vs cargo bench --bench pipe
#   logs      oneway.c (4 x 250,000)     vs benches/log_throughput.sh
#   rss       idle_parent.c, nginx master (if installed) vs the idle watcher, 2 workers
#   status    /bin/true (exec floor)     vs cluster status --json, 50 runs each
#
# Needs cc, python3 (and nginx for its row). Cleans up on exit or ^C.
set -euo pipefail
cd "$(dirname "$0")/../.."
ONLY=${ONLY:-}
want() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

for c in seqpacket_rtt fd_pass oneway idle_parent; do
  cc -O2 -pthread -Wall -o "$work/$c" "benches/limits/$c.c"
done
cargo build --release --quiet --examples --bin cluster
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo "$(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), load $(cut -d' ' -f1-3 /proc/loadavg)"

if want messages; then
  echo "== message round trip"
  "$work/seqpacket_rtt" 20000
  cargo bench --quiet --bench messages 2>/dev/null | grep 'round trip'
fi

if want handoff; then
  echo "== client socket handoff"
  "$work/fd_pass" 500000
  cargo bench --quiet --bench pipe -- --noplot 2>/dev/null | grep -E 'thrpt' || true
fi

if want logs; then
  echo "== log forwarding"
  "$work/oneway" 250000 4
  bash benches/log_throughput.sh
fi

# VmRSS, RssAnon and RssFile of a pid, in KiB.
rss() { awk '/^(VmRSS|RssAnon|RssFile):/ {printf "%s %s kB  ", $1, $2}' "/proc/$1/status"; echo; }

if want rss; then
  echo "== idle RSS (after 5 s idle)"
  "$work/idle_parent" >"$work/idle.pid" &
  pids+=($!)
  port=$(free_port)
  target/release/cluster --workers 2 --log-level warn target/release/examples/hello_http "127.0.0.1:$port" 2>/dev/null &
  watcher=$!
  pids+=("$watcher")
  if command -v nginx >/dev/null; then
    nport=$(free_port)
    mkdir -p "$work/nginx"
    cat >"$work/nginx.conf" <<EOF
daemon off; master_process on; worker_processes 2; pid $work/nginx.pid;
error_log $work/nginx/error.log;
events {}
http { access_log off; client_body_temp_path $work/nginx; proxy_temp_path $work/nginx;
       fastcgi_temp_path $work/nginx; uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
       server { listen 127.0.0.1:$nport; return 200 "ok"; } }
EOF
    nginx -c "$work/nginx.conf" -p "$work/nginx" &
    pids+=($!)
  fi
  sleep 5
  echo -n "limit: C parent of 2 children, epoll_wait:  "; rss "$(cat "$work/idle.pid")"
  if [ -f "$work/nginx.pid" ]; then
    echo -n "limit: nginx master, 2 workers:              "; rss "$(cat "$work/nginx.pid")"
  fi
  echo -n "cluster watcher, 2 hello_http workers:       "; rss "$watcher"
fi

if want status; then
  echo "== cluster status --json (release, 2 workers), 50 runs"
  port=$(free_port)
  target/release/cluster --workers 2 --log-level warn --pid-file "$work/s.pid" \
    target/release/examples/hello_http "127.0.0.1:$port" 2>/dev/null &
  pids+=($!)
  for _ in $(seq 100); do target/release/cluster status -q --pid-file "$work/s.pid" 2>/dev/null && break; sleep 0.1; done
  sleep 1.5 # one CPU sample of the workers is there
  python3 - "$work/s.pid" <<'PY'
import subprocess, sys, time
def times(cmd):
    out = []
    for _ in range(50):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
        out.append((time.perf_counter() - t0) * 1000)
    out.sort()
    return out[len(out) // 2], out[int(len(out) * 0.9)]
m, p = times(["/bin/true"])
print(f"limit: exec of /bin/true, 50 runs: median {m:.2f} ms, p90 {p:.2f} ms")
m, p = times(["target/release/cluster", "status", "--json", "--pid-file", sys.argv[1]])
print(f"cluster status --json, 50 runs: median {m:.2f} ms, p90 {p:.2f} ms")
PY
fi
