#!/usr/bin/env python3
"""A worker that speaks the watcher's wire protocol by hand, to misbehave.

The integration tests in tests/hardening.rs run it under the real `cluster`
binary. It takes the socketpair end named by CLUSTER_IPC_FD and sends
postcard-encoded `ToWatcher` messages (see src/ipc/message.rs; keep
PROTOCOL and the variant numbers in step with it).

    evil_worker.py MODE [ARGS...]

Modes (the first slot misbehaves, every other slot behaves, unless
EVIL_ALL=1):
    behave                 hello, ready, answer pings forever
    flood-requests N ADDR  hello, then N socket requests, never reads
    distinct ADDR...       hello, ask for each address, print each answer
    distinct-once MARK ADDR...
                           the same the first time (MARK does not exist:
                           it is created); later only the first address
    empty-datagram         hello, ready, then an empty datagram, then
                           keep answering pings
    garbage                hello, ready, then bytes that decode to nothing
    bad-logs               hello, ready, one good Logs batch ("a good
                           record"), then a Logs batch cut inside a record
"""

import os
import select
import socket
import sys
import time

PROTOCOL = 5

# ToWatcher variants
HELLO, READY, SOCKET_REQUEST, PONG = 0, 1, 2, 3
LOGS = 5
# ToWorker variants
W_HELLO, W_SOCKET_REPLY, W_STOP, W_PING = 0, 1, 2, 3


def varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def read_varint(buf, i):
    n, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        n |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return n, i


def string(s):
    b = s.encode()
    return varint(len(b)) + b


def main():
    sock = socket.socket(fileno=int(os.environ["CLUSTER_IPC_FD"]))
    slot = int(os.environ.get("CLUSTER_SLOT", "1"))
    mode = sys.argv[1] if len(sys.argv) > 1 else "behave"
    if slot != 1 and os.environ.get("EVIL_ALL") != "1":
        mode = "behave"
    send = sock.send
    send(bytes([HELLO]) + varint(PROTOCOL) + varint(os.getpid()))

    def serve_forever():
        while True:
            r, _, _ = select.select([sock], [], [], 1.0)
            if not r:
                continue
            msg, fds, _, _ = socket.recv_fds(sock, 70000, 8)
            for fd in fds:
                os.close(fd)
            if not msg:
                return
            kind, i = read_varint(msg, 0)
            if kind == W_PING:
                seq, _ = read_varint(msg, i)
                send(bytes([PONG]) + varint(seq))
            elif kind == W_STOP:
                return

    if mode == "behave":
        send(bytes([READY]))
        serve_forever()
    elif mode == "flood-requests":
        n, addr = int(sys.argv[2]), sys.argv[3]
        for i in range(n):
            try:
                send(bytes([SOCKET_REQUEST]) + varint(i + 1) + string(addr))
            except OSError as e:
                print(f"evil: send {i}: {e}", flush=True)
                break
        print(f"evil: sent {n} requests", flush=True)
        time.sleep(1000)
    elif mode in ("distinct", "distinct-once"):
        send(bytes([READY]))
        addrs = sys.argv[2:]
        if mode == "distinct-once":
            mark, addrs = addrs[0], addrs[1:]
            if os.path.exists(mark):
                addrs = addrs[:1]
            else:
                open(mark, "w").close()
        for i, addr in enumerate(addrs):
            send(bytes([SOCKET_REQUEST]) + varint(i + 1) + string(addr))
            while True:
                msg, fds, _, _ = socket.recv_fds(sock, 70000, 8)
                for fd in fds:
                    os.close(fd)
                kind, j = read_varint(msg, 0)
                if kind == W_PING:
                    seq, _ = read_varint(msg, j)
                    send(bytes([PONG]) + varint(seq))
                    continue
                if kind != W_SOCKET_REPLY:
                    continue
                _, j = read_varint(msg, j)  # id
                ok = msg[j] == 0
                if ok:
                    print(f"evil: granted {addr} ({len(fds)} fd)", flush=True)
                else:
                    n, j = read_varint(msg, j + 1)
                    why = msg[j : j + n].decode()
                    print(f"evil: refused {addr}: {why}", flush=True)
                break
        print("evil: done", flush=True)
        serve_forever()
    elif mode == "empty-datagram":
        send(bytes([READY]))
        send(b"")
        serve_forever()
    elif mode == "garbage":
        send(bytes([READY]))
        send(b"\xff\xff\xff\xff\xff\xff\xff")
        serve_forever()
    elif mode == "bad-logs":
        send(bytes([READY]))
        # LogRecord: level (u8), target, message, fields, spans, ts_nanos.
        record = bytes([3]) + string("evil") + string("a good record")
        record += varint(0) + varint(0) + varint(time.time_ns())
        send(bytes([LOGS]) + varint(1) + record)
        # A record whose target says 5 bytes and has 2.
        send(bytes([LOGS]) + varint(1) + bytes([3]) + varint(5) + b"ab")
        serve_forever()
    else:
        print(f"evil: unknown mode {mode}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
