// graphile-worker and pg-boss on the same database and job count as
// benches/jobs_pg.rs, for benches/jobs_pg_compare.sh:
//
//   node peers.js graphile URL N [localQueueSize]
//   node peers.js pgboss   URL N [batchSize]
//
// Throughput: N no-op jobs inserted in bulk while the worker is idle, time
// until the database says all are done (the insert included). Pickup
// latency: 100 single jobs on an idle queue, insert call to handler start.
'use strict';
const { Client } = require('pg');

const [, , which, url, nArg, tune] = process.argv;
const N = Number(nArg || 50000);
const sleep = ms => new Promise(r => setTimeout(r, ms));
const now = () => Number(process.hrtime.bigint() / 1000n) / 1000; // ms

function pct(xs, p) {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.round((s.length - 1) * p)];
}

async function waitCount(sql, target) {
  const c = new Client({ connectionString: url });
  await c.connect();
  for (;;) {
    const r = await c.query(sql);
    if (Number(r.rows[0].n) === target) break;
    await sleep(20);
  }
  await c.end();
}

async function graphile() {
  const { run, makeWorkerUtils } = require('graphile-worker');
  const size = Number(tune || -1);
  const utils = await makeWorkerUtils({ connectionString: url });
  await utils.migrate();
  let onStart = null;
  const runner = await run({
    connectionString: url,
    concurrency: 10,
    noHandleSignals: true,
    logger: new (require('graphile-worker').Logger)(() => () => {}),
    taskList: { noop: async () => { if (onStart) onStart(); } },
    preset: size > 0 ? { worker: { localQueue: { size } } } : {},
  });
  await sleep(500);
  const t0 = now();
  for (let i = 0; i < N; i += 5000) {
    const batch = [];
    for (let j = i; j < Math.min(N, i + 5000); j++) batch.push({ identifier: 'noop', payload: { i: j } });
    await utils.addJobs(batch);
  }
  const submitted = now() - t0;
  await waitCount('SELECT count(*) AS n FROM graphile_worker._private_jobs', 0);
  const took = (now() - t0) / 1000;
  console.log(`graphile-worker 0.18 (concurrency 10, localQueue ${size}): ${N} jobs in ${took.toFixed(2)}s (submit ${submitted.toFixed(0)}ms): ${(N / took).toFixed(0)} jobs/s end to end`);
  const lat = [];
  for (let i = 0; i < 100; i++) {
    const started = new Promise(r => { onStart = r; });
    const sent = now();
    await utils.addJob('noop', { i });
    await started;
    lat.push(now() - sent);
    await sleep(10);
  }
  onStart = null;
  console.log(`graphile-worker pickup latency, idle queue, 100 samples: p50 ${pct(lat, 0.5).toFixed(3)} ms, p99 ${pct(lat, 0.99).toFixed(3)} ms`);
  await runner.stop();
  await utils.release();
}

async function pgboss() {
  const { PgBoss } = require('pg-boss');
  const batchSize = Number(tune || 1);
  const boss = new PgBoss({ connectionString: url, schema: 'pgboss_bench' });
  boss.on('error', e => console.error(e.message));
  await boss.start();
  const q = `noop_${batchSize}`;
  await boss.createQueue(q);
  let onStart = null;
  await boss.work(q, { batchSize, pollingIntervalSeconds: 0.5 }, async jobs => { if (onStart) onStart(); });
  await sleep(500);
  const t0 = now();
  for (let i = 0; i < N; i += 5000) {
    const batch = [];
    for (let j = i; j < Math.min(N, i + 5000); j++) batch.push({ data: { i: j } });
    await boss.insert(q, batch);
  }
  const submitted = now() - t0;
  await waitCount(`SELECT count(*) AS n FROM pgboss_bench.job WHERE name = '${q}' AND state = 'completed'`, N);
  const took = (now() - t0) / 1000;
  console.log(`pg-boss 12 (batchSize ${batchSize}, polling 0.5 s): ${N} jobs in ${took.toFixed(2)}s (submit ${submitted.toFixed(0)}ms): ${(N / took).toFixed(0)} jobs/s end to end`);
  const lat = [];
  for (let i = 0; i < 50; i++) {
    const started = new Promise(r => { onStart = r; });
    const sent = now();
    await boss.send(q, { i });
    await started;
    lat.push(now() - sent);
    await sleep(10);
  }
  onStart = null;
  console.log(`pg-boss pickup latency, idle queue, 50 samples: p50 ${pct(lat, 0.5).toFixed(3)} ms, p99 ${pct(lat, 0.99).toFixed(3)} ms`);
  await boss.stop({ graceful: false, wait: false });
}

(which === 'graphile' ? graphile() : pgboss()).then(() => process.exit(0), e => { console.error(e); process.exit(1); });
