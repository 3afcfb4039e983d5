// Node's cluster module serving the same response as examples/hello_http.rs:
// `200 Hello, World!`, text/plain, an x-worker-id header, keep-alive.
//
//   node benches/compare/node_cluster.js PORT [WORKERS]
//
// The primary forks WORKERS workers (default 2) and, with Node's default
// scheduling policy on Linux (SCHED_RR), accepts every connection itself and
// hands it to the workers in turn. NODE_CLUSTER_SCHED_POLICY=none makes the
// workers accept from one shared socket instead (as `cluster` and nginx do).
// SIGTERM/SIGINT stop the workers, then the primary.
'use strict';

const cluster = require('node:cluster');
const http = require('node:http');

const port = Number(process.argv[2] || 8080);
const workers = Number(process.argv[3] || 2);

if (cluster.isPrimary) {
  let stopping = false;
  for (let i = 0; i < workers; i++) cluster.fork();
  cluster.on('exit', (worker, code, signal) => {
    if (!stopping) {
      console.error(`node_cluster: worker ${worker.id} exited (${signal || code}); forking another`);
      cluster.fork();
    } else if (Object.keys(cluster.workers).length === 0) {
      process.exit(0);
    }
  });
  const stop = () => {
    if (stopping) process.exit(1);
    stopping = true;
    for (const id in cluster.workers) cluster.workers[id].kill('SIGTERM');
    setTimeout(() => process.exit(0), 3000).unref();
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
} else {
  const body = Buffer.from('Hello, World!');
  const id = String(cluster.worker.id);
  const server = http.createServer((req, res) => {
    res.writeHead(200, {
      'content-type': 'text/plain',
      'content-length': body.length,
      'x-worker-id': id,
    });
    res.end(body);
  });
  server.keepAliveTimeout = 65000; // keep-alive is on by default; no idle close mid-run
  server.listen(port, '127.0.0.1');
  process.on('SIGTERM', () => server.close(() => process.exit(0)));
}
