// An HTTP server for `cluster --listen`, Node's standard library only.
//
//     cluster --workers 2 --listen 127.0.0.1:8080 node examples/node/server.js
//
// * It serves from the socket the watcher passes as descriptor 3 (when
//   LISTEN_PID is its own pid and LISTEN_FDS is set), or, run alone, binds
//   the address given as its argument (default 127.0.0.1:8080).
// * Without --notify the watcher counts it ready after --ready-delay (1 s).
//   Node has no Unix datagram sockets, so with --notify it says READY=1
//   through `systemd-notify --ready` (a child process: the watcher accepts
//   messages from the worker's process group), where that is installed.
// * On SIGTERM it drains: it stops accepting, answers the requests still
//   arriving on open keep-alive connections with `Connection: close` for
//   up to 2 s (so busy clients get their response and reconnect to a live
//   worker), then exits.
'use strict';

const http = require('node:http');
const net = require('node:net');
const { execFile } = require('node:child_process');

const DRAIN_MS = 2000;
const inherited =
  process.env.LISTEN_PID === String(process.pid) && Number(process.env.LISTEN_FDS) >= 1;
let draining = false;

const server = http.createServer((req, res) => {
  res.setHeader('Content-Type', 'text/plain');
  res.setHeader('X-Pid', String(process.pid));
  if (draining) res.setHeader('Connection', 'close');
  res.end(`Hello from pid ${process.pid}\n`);
});

function notify(args) {
  if (!process.env.NOTIFY_SOCKET) return;
  execFile('systemd-notify', args, (err) => {
    if (err) console.error(`systemd-notify ${args.join(' ')}: ${err.message}`);
  });
}

const [host, port] = (process.argv[2] || '127.0.0.1:8080').split(/:(?=[^:]*$)/);
server.listen(inherited ? { fd: 3 } : { host, port: Number(port) }, () => notify(['--ready']));

process.on('SIGTERM', () => {
  draining = true;
  // net.Server's close stops accepting and leaves open connections alone
  // (http.Server's close also drops idle keep-alive connections at once,
  // which races with a client sending its next request on one).
  net.Server.prototype.close.call(server, () => process.exit(0));
  setTimeout(() => process.exit(0), DRAIN_MS).unref();
});
