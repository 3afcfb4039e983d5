#!/usr/bin/env python3
"""Runs a command and tells where the CPU went: the user and system time
that every process on the machine used while the command ran (from /proc,
sampled every 100 ms), summed by command name (postgres, cluster, jobs,
and whatever else the machine was running: other work shows up too), and
the idle rest of the cores. A poor man's profile of an end-to-end
benchmark: a run that leaves the cores idle waits on something else (for
a durable PostgreSQL, the WAL fsync).

    benches/cpu_split.py CMD ARGS...
    PG_DURABLE=1 .ci/with-postgres benches/cpu_split.py \
        env CLUSTER_BENCH_PG=... cargo bench --bench jobs_pg -- 50000 throughput

A process that exits loses at most its last 100 ms.
"""
import os
import subprocess
import sys
import time

TICK = os.sysconf("SC_CLK_TCK")


def sample():
    out = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
        except OSError:
            continue
        comm = data[data.index("(") + 1:data.rindex(")")]
        fields = data[data.rindex(")") + 2:].split()
        out[int(pid)] = (comm, int(fields[11]) + int(fields[12]), int(fields[19]))
    return out


before = sample()
seen = {}
t0 = time.time()
proc = subprocess.Popen(sys.argv[1:])
while proc.poll() is None:
    for pid, (comm, cpu, start) in sample().items():
        base = before.get(pid)
        used = cpu - (base[1] if base and base[2] == start else 0)
        seen[(pid, start)] = (comm, used)
    time.sleep(0.1)
wall = time.time() - t0
total = {}
for comm, used in seen.values():
    total[comm] = total.get(comm, 0) + used
cores = os.cpu_count() or 1
avail = cores * wall
print(f"cpu split over {wall:.1f}s wall, {cores} cores = {avail:.1f} cpu-s available:", file=sys.stderr)
for comm, used in sorted(total.items(), key=lambda kv: -kv[1])[:8]:
    print(f"  {comm:<16} {used / TICK:7.2f} cpu-s {100 * used / TICK / avail:5.1f}%", file=sys.stderr)
busy = sum(total.values()) / TICK
print(f"  {'(all processes)':<16} {busy:7.2f} cpu-s {100 * busy / avail:5.1f}%", file=sys.stderr)
print(f"  {'(idle)':<16} {max(avail - busy, 0):7.2f} cpu-s {100 * max(avail - busy, 0) / avail:5.1f}%", file=sys.stderr)
sys.exit(proc.returncode)
