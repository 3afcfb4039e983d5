#!/usr/bin/env bash
# Forwarded log records per second through the watcher from 4 workers:
# each worker logs N records through `Cluster::log_layer()` as fast as it
# can; the watcher writes them as JSON lines to a file. Reports records
# delivered, records dropped (counted and reported by workers and watcher),
# and the delivered rate between the first and the last record.
#
#   bash benches/log_throughput.sh            # 4 workers x 250,000 records
#   WORKERS=4 N=100000 bash benches/log_throughput.sh
#   CLUSTER=/tmp/other/cluster bash benches/log_throughput.sh   # another build
set -euo pipefail
WORKERS=${WORKERS:-4}
N=${N:-250000}
cd "$(dirname "$0")/.."
cargo build --release --quiet --examples --bin cluster
out=$(mktemp)
pid=
cleanup() { [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null; rm -f "$out"; }
trap cleanup EXIT INT TERM
"${CLUSTER:-target/release/cluster}" --workers "$WORKERS" --log-format json --log-level info \
  target/release/examples/test_worker log "$N" 0 2>"$out" &
pid=$!
# Wait until the output stops growing for a second (or 120 s): the
# workers' final "done" lines may themselves be dropped in a flood.
last=-1
for _ in $(seq 120); do
  sleep 1
  size=$(stat -c %s "$out")
  [ "$size" -gt 0 ] && [ "$size" -eq "$last" ] && break
  last=$size
done
kill -TERM "$pid"; wait "$pid" || true; pid=
python3 - "$out" "$WORKERS" "$N" <<'PY'
import json, sys, datetime
path, workers, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
count, dropped, first, last = 0, 0, None, None
for line in open(path):
    v = json.loads(line)
    msg = v.get("message", "")
    if v.get("source") == "worker" and msg == "record":
        count += 1
        ts = datetime.datetime.fromisoformat(v["ts"].replace("Z", "+00:00")).timestamp()
        first = ts if first is None else min(first, ts)
        last = ts if last is None else max(last, ts)
    elif "dropped" in msg:
        dropped += int(msg.split()[0])
span = (last - first) if count else 0
print(f"{workers} workers x {n} records: delivered {count} ({count/(workers*n):.1%}), dropped {dropped}, "
      f"{span:.3f} s from first to last record -> {count/span if span else 0:,.0f} records/s delivered")
PY
