#!/usr/bin/env python3
"""An HTTP server for `cluster --listen`, standard library only.

    cluster --workers 2 --listen 127.0.0.1:8080 --notify python3 examples/python/server.py

* It serves from the socket the watcher passes as descriptor 3 (when
  LISTEN_PID is its own pid and LISTEN_FDS is set), or, run alone, binds
  the address given as its argument (default 127.0.0.1:8080).
* It says READY=1 on NOTIFY_SOCKET once it serves (the readiness gate of a
  rolling restart), and, when WATCHDOG_USEC is set, WATCHDOG=1 from its
  serving loop: a loop that hangs stops the pings and gets replaced.
* On SIGTERM it drains: it stops accepting, answers the requests still
  arriving on open keep-alive connections with `Connection: close` for up
  to 2 s (so busy clients get their response and reconnect to a live
  worker), then exits.
"""

import os
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DRAIN_SECONDS = 2.0


def inherited_socket():
    """Descriptor 3 when the watcher (or systemd) passed it to this process."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        return socket.socket(fileno=3)
    return None


def notify(message):
    """sd_notify: one datagram to NOTIFY_SOCKET (a path, or @abstract)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(message.encode(), path)


draining = threading.Event()
connections = 0
connections_lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    # Headers and body go out in two writes: without TCP_NODELAY, Nagle's
    # algorithm and the client's delayed ACK hold each response ~40 ms.
    disable_nagle_algorithm = True

    def do_GET(self):
        body = f"Hello from pid {os.getpid()}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Pid", str(os.getpid()))
        if draining.is_set():
            self.send_header("Connection", "close")  # also ends this connection
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    watchdog_every = None
    next_watchdog = 0.0

    def process_request(self, request, client_address):
        # Counted before its thread starts, so a drain never misses it.
        global connections
        with connections_lock:
            connections += 1
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        global connections
        try:
            super().process_request_thread(request, client_address)
        finally:
            with connections_lock:
                connections -= 1

    def service_actions(self):
        # Called by serve_forever's loop about every 0.5 s: a live loop pings.
        if self.watchdog_every and time.monotonic() >= self.next_watchdog:
            notify("WATCHDOG=1")
            self.next_watchdog = time.monotonic() + self.watchdog_every


def main():
    sock = inherited_socket()
    if sock is None:
        host, port = (sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8080").rsplit(":", 1)
        sock = socket.create_server((host, int(port)))
    # The accept loop waits in select(); non-blocking, so another worker
    # taking the connection first never blocks this one in accept().
    sock.setblocking(False)
    server = Server(sock.getsockname()[:2], Handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    usec = os.environ.get("WATCHDOG_USEC")
    if usec and os.environ.get("WATCHDOG_PID", str(os.getpid())) == str(os.getpid()):
        server.watchdog_every = int(usec) / 2e6
        server.next_watchdog = time.monotonic()

    def drain(signum, frame):
        draining.set()
        notify("STOPPING=1")
        threading.Thread(target=server.shutdown).start()  # ends serve_forever

    signal.signal(signal.SIGTERM, drain)
    signal.signal(signal.SIGINT, drain)
    notify(f"READY=1\nSTATUS=serving as pid {os.getpid()}")
    server.serve_forever(poll_interval=0.1)
    deadline = time.monotonic() + DRAIN_SECONDS
    while connections > 0 and time.monotonic() < deadline:
        time.sleep(0.02)


if __name__ == "__main__":
    main()
