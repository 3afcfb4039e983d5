#!/usr/bin/env python3
"""Chaos under load: kill a random worker every 200 ms while wrk drives
hello_http under `cluster --workers 4`, for each --balance mode.

    cargo build --release --bin cluster --examples
    python3 benches/chaos.py [--seconds 60] [--workers 4] [--modes shared,reuseport,...]

Each victim is frozen (SIGSTOP), its TCP connections counted (what a
kill can cost at most), then killed (SIGKILL). The worker count is sampled
every 10 ms: "zero-worker time" is the total time no worker ran, "recovery"
the time from a kill until the count is back to --workers. wrk's socket
errors and non-2xx responses are the failures. Needs wrk (Debian: wrk).
"""

import argparse
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTER = os.path.join(ROOT, "target/release/cluster")
HELLO = os.path.join(ROOT, "target/release/examples/hello_http")
MODES = ["shared", "reuseport", "round-robin", "least-connections", "ip-hash"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid):
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
        except OSError:
            pass
    return out


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except OSError:
        return False


def tcp_sockets(pid):
    with open("/proc/net/unix") as f:
        unix = {l.split()[6] for l in f.readlines()[1:] if len(l.split()) > 6}
    n = 0
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                t = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if t.startswith("socket:[") and t[8:-1] not in unix:
                n += 1
    except OSError:
        pass
    return n


def wait_serving(port, deadline=15):
    end = time.time() + deadline
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(12).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.05)
    sys.exit(f"not serving on {port}")


def run(mode, seconds, workers):
    port = free_port()
    watcher = subprocess.Popen(
        [CLUSTER, "--workers", str(workers), "--balance", mode, "--log-level", "error",
         HELLO, f"127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_serving(port)
        while len([p for p in children(watcher.pid) if alive(p)]) < workers:
            time.sleep(0.05)
        wrk = subprocess.Popen(
            ["wrk", "-t2", "-c32", f"-d{seconds}s", "--timeout", "5s",
             f"http://127.0.0.1:{port}/"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(0.5)
        rng = random.Random(port)
        held = kills = 0
        zero = 0.0
        recovery = []
        pending = []  # kill times waiting for the count to be back
        start = time.time()
        next_kill = start
        last = start
        while time.time() - start < seconds - 1:
            now = time.time()
            live = [p for p in children(watcher.pid) if alive(p)]
            if not live:
                zero += now - last
            if len(live) >= workers and pending:
                recovery += [now - t for t in pending]
                pending = []
            last = now
            if now >= next_kill and live:
                victim = rng.choice(live)
                os.kill(victim, signal.SIGSTOP)
                held += max(0, tcp_sockets(victim) - (1 if mode in ("shared", "reuseport") else 0))
                os.kill(victim, signal.SIGKILL)
                kills += 1
                pending.append(now)
                next_kill += 0.2
            time.sleep(0.01)
        out, _ = wrk.communicate()
    finally:
        watcher.send_signal(signal.SIGTERM)
        try:
            watcher.wait(15)
        except subprocess.TimeoutExpired:
            watcher.kill()
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    socket_errors = sum(int(x) for x in errs.groups()) if errs else 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(non2xx.group(1)) if non2xx else 0
    recovery.sort()
    p50 = recovery[len(recovery) // 2] * 1000 if recovery else 0
    worst = recovery[-1] * 1000 if recovery else 0
    return reqs, socket_errors + non2xx, held, kills, zero, p50, worst


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--modes", default=",".join(MODES))
    a = ap.parse_args()
    for path in (CLUSTER, HELLO):
        if not os.path.exists(path):
            sys.exit(f"{path} missing: cargo build --release --bin cluster --examples")
    print(f"chaos: kill a random worker every 200 ms for {a.seconds} s, "
          f"{a.workers} workers, wrk -t2 -c32")
    print("| mode | requests | failed | held by victims | kills | zero-worker time | recovery p50 | recovery max |")
    print("|---|---|---|---|---|---|---|---|")
    for mode in a.modes.split(","):
        reqs, failed, held, kills, zero, p50, worst = run(mode, a.seconds, a.workers)
        print(f"| {mode} | {reqs} | {failed} | {held} | {kills} | {zero * 1000:.0f} ms "
              f"| {p50:.1f} ms | {worst:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
