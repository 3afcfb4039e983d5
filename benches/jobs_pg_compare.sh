#!/usr/bin/env bash
# Jobs on PostgreSQL side by side, in one run on one durable server
# (fsync and synchronous_commit on, started by .ci/with-postgres):
#
#   1. pgbench: the raw ceiling of this store's own claim and finish SQL
#      (claim a batch with FOR UPDATE SKIP LOCKED, then move it to
#      jobs_done), batches of 1 and of 100, 8 clients;
#   2. cluster end to end (benches/jobs_pg.rs): 1, 2 and 4 nodes, pickup;
#   3. graphile-worker (defaults, and localQueue 500) and pg-boss
#      (batchSize 1000) from npm, same job count, same database.
#
#   cargo build --release --bin cluster --examples
#   benches/jobs_pg_compare.sh [JOBS]        # default 50000
#   PARTS="pgbench cluster" benches/jobs_pg_compare.sh   # some parts only (default: pgbench cluster peers)
#   benches/cpu_split.py benches/jobs_pg_compare.sh      # and where the CPU went
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-50000}"
if [ -z "${CLUSTER_BENCH_PG:-}" ]; then
  PG_DURABLE=1 exec .ci/with-postgres env CLUSTER_BENCH_PG=__from_with_postgres__ "$0" "$@"
fi
[ "$CLUSTER_BENCH_PG" = __from_with_postgres__ ] && CLUSTER_BENCH_PG="$CLUSTER_TEST_PG"
URL="$CLUSTER_BENCH_PG"
PARTS="${PARTS:-pgbench cluster peers}"
part() { [[ " $PARTS " == *" $1 "* ]]; }
echo "== $(date -u +%FT%TZ), $(nproc) cores, $(psql -Atc 'show server_version' "$URL"), synchronous_commit $(psql -Atc 'show synchronous_commit' "$URL"), fsync $(psql -Atc 'show fsync' "$URL")"

# 1. pgbench on the store's own SQL.
if part pgbench; then
target/release/cluster jobs submit --jobs "$URL?schema=pgb" --json 0 >/dev/null
cols="id, queue, name, args, key, key_explicit, state, attempt, max_attempts, run_at, priority, pool, node, worker, result, errors, created_at, started_at, finished_at"
script="$(mktemp)"
for batch in 1 100; do
  total=$(( batch == 1 ? 20000 : 400000 ))
  psql -q "$URL" <<SQL
TRUNCATE pgb.jobs, pgb.jobs_done;
INSERT INTO pgb.jobs (queue, args, key, state, max_attempts, run_at, created_at)
  SELECT 'default', '["x"]', md5(i::text), 'queued', 3, now(), now() FROM generate_series(1, $total) i;
VACUUM ANALYZE pgb.jobs;
SQL
  cat > "$script" <<SQL
WITH picked AS (SELECT id FROM pgb.jobs WHERE state = 'queued' AND queue = 'default' AND run_at <= now() ORDER BY priority, run_at, id LIMIT $batch FOR UPDATE SKIP LOCKED) UPDATE pgb.jobs j SET state = 'running', attempt = j.attempt + 1, started_at = now(), pool = 'p', node = 'pgb' || :client_id, worker = NULL, cancel_requested = false, exclusive = false FROM picked WHERE j.id = picked.id RETURNING j.id, j.args::text;
WITH d AS (DELETE FROM pgb.jobs j WHERE j.state = 'running' AND j.node = 'pgb' || :client_id RETURNING j.*) INSERT INTO pgb.jobs_done ($cols) SELECT id, queue, name, args, key, key_explicit, 'done', attempt, max_attempts, run_at, priority, pool, node, worker, '{"ok":true}', errors, created_at, started_at, now() FROM d;
SQL
  tps=$(pgbench -n -c 8 -j 2 -t $(( total / batch / 8 )) -f "$script" "$URL" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p')
  echo "pgbench, this store's claim + move to jobs_done, batch $batch, 8 clients: $(python3 -c "print(round($tps * $batch))") jobs/s ($tps transactions/s of two statements)"
done
rm -f "$script"
fi

# 2. cluster end to end.
if part cluster; then
  CLUSTER_BENCH_PG="$URL" cargo bench -q --bench jobs_pg -- "$N" 2>&1 | grep -v '^$'
fi

# 3. The peers, from npm, in a scratch dir.
part peers || exit 0
peers="${PEERS_DIR:-/tmp/cluster-bench-peers}"
if [ ! -d "$peers/node_modules/graphile-worker" ]; then
  mkdir -p "$peers"
  (cd "$peers" && npm install --silent --no-audit --no-fund graphile-worker@0.18.0 pg-boss@12.38.0 pg >/dev/null)
fi
cp benches/peers/peers.js "$peers/"
(cd "$peers" && node peers.js graphile "$URL" "$N")
(cd "$peers" && node peers.js graphile "$URL" "$N" 500)
(cd "$peers" && node peers.js pgboss "$URL" "$N" 1000)
