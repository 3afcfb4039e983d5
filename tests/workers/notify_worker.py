#!/usr/bin/env python3
"""A worker that does not use the library, for tests/any_language.rs: it
serves `GET /` (one response per connection) from descriptor 3 and does
what its mode says on NOTIFY_SOCKET.

    ready-unless-mark   READY=1, unless the file $TEST_MARK exists at start
    watchdog-until-mark READY=1, then WATCHDOG=1 every WATCHDOG_USEC/2 until
                        $TEST_MARK exists
    child-after-mark    never READY=1 itself; once $TEST_MARK exists, a child
                        process (same process group) sends READY=1
    garbage             garbage of every kind, then creates $TEST_MARK, then
                        (1 s later) STATUS=garbage survived and READY=1
    signal              READY=1; prints the signal that stops it, then exits
"""

import array
import os
import signal
import socket
import subprocess
import sys
import threading
import time

MODE = sys.argv[1]
MARK = os.environ.get("TEST_MARK", "")
ADDR = os.environ.get("NOTIFY_SOCKET", "")


def send(data, fds=()):
    # (socket.send_fds drops its address argument in Python 3.11.)
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendmsg([data], rights, 0, ADDR)


def serve():
    listener = socket.socket(fileno=3)
    listener.setblocking(True)
    while True:
        conn, _ = listener.accept()
        conn.recv(4096)
        body = str(os.getpid()).encode()
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        conn.close()


def marked():
    return bool(MARK) and os.path.exists(MARK)


def main():
    threading.Thread(target=serve, daemon=True).start()
    if MODE == "ready-unless-mark":
        if not marked():
            send(b"READY=1")
    elif MODE == "watchdog-until-mark":
        send(b"READY=1")
        every = int(os.environ["WATCHDOG_USEC"]) / 2e6
        while not marked():
            send(b"WATCHDOG=1")
            time.sleep(every)
    elif MODE == "child-after-mark":
        while not marked():
            time.sleep(0.05)
        code = "import os, socket; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])"
        subprocess.run([sys.executable, "-c", code], check=True)
    elif MODE == "garbage":
        r, w = os.pipe()
        send(b"")
        send(os.urandom(512))
        send(b"\xff\xfe\x00READY=1\x00")  # a NUL-laden line is not READY=1
        send(b"READY=yes\nWATCHDOG=0\nSTOPPING=0\n=\n==\nNOEQUALS")
        send(b"X" * 10000 + b"\nREADY=1")  # too long: ignored whole
        send(b"STATUS=with a descriptor", fds=[r])
        send(b"STATUS=" + "é\x07".encode() * 300)
        with open(MARK, "w"):
            pass  # the garbage is sent
        time.sleep(1)
        send(b"STATUS=garbage survived\nREADY=1")
    elif MODE == "signal":
        def stop(signum, frame):
            print(f"stopped by {signal.Signals(signum).name}", flush=True)
            os._exit(0)
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
            signal.signal(s, stop)
        send(b"READY=1")
    while True:
        time.sleep(1)


main()
