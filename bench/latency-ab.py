#!/usr/bin/env python3
"""Edit-to-visible latency of two builds, measured side by side.

    python3 bench/latency-ab.py BASE_BIN_DIR NEW_BIN_DIR [SAMPLES]

Starts one host and one guest agent of each build (Unix sockets, a share each, in a temp
directory under BENCH_DIR), then writes 1 KiB files alternately into each pair, host -> guest
and guest -> host, and times each until the other side reads the same bytes. Samples alternate
build by build (and which build goes first alternates too), so the load a shared machine puts
on one build's samples it puts on the other's: on these machines p50 moves by 2x between runs
minutes apart, while this ratio holds. Prints p50/p90/p99 per build and direction and the new
build's p50 as a ratio of the base's. Standard library only; every process it starts is stopped
by PID.
"""
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

WARMUP = 5
FILE_BYTES = 1024
GAP_S = 0.01
SAMPLE_TIMEOUT_S = 30


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))]


def start_pair(work, bindir, procs):
    for d in ("host/lat-h2g", "guest/lat-g2h"):
        os.makedirs(os.path.join(work, d))
    with open(f"{work}/guest.toml", "w") as f:
        f.write(f'listen = "unix:{work}/guest.sock"\nstate_dir = "{work}/guest-state"\n'
                f'control = "{work}/guest.ctl"\n[[share]]\nname = "src"\npath = "{work}/guest"\n')
    with open(f"{work}/host.toml", "w") as f:
        f.write(f'guest = "unix:{work}/guest.sock"\nstate_dir = "{work}/host-state"\n'
                f'control = "{work}/host.ctl"\n[[share]]\nname = "src"\npath = "{work}/host"\n')
    guest = subprocess.Popen([f"{bindir}/vmsync-guest", "run", "--config", f"{work}/guest.toml"],
                             stdin=subprocess.DEVNULL, stderr=open(f"{work}/guest.log", "w"))
    procs.append(guest)
    deadline = time.monotonic() + 30
    while not os.path.exists(f"{work}/guest.sock"):
        if time.monotonic() > deadline or guest.poll() is not None:
            raise RuntimeError(f"{bindir}/vmsync-guest did not listen (see {work}/guest.log)")
        time.sleep(0.01)
    procs.append(subprocess.Popen([f"{bindir}/vmsync-host", "run", "--config",
                                   f"{work}/host.toml"],
                                  stdin=subprocess.DEVNULL, stderr=open(f"{work}/host.log", "w")))
    subprocess.run([f"{bindir}/vmsync-host", "wait", "--config", f"{work}/host.toml",
                    "--timeout", "60"], check=True)


def sample(work, direction, rng):
    if direction == "host->guest":
        src, dst = f"{work}/host/lat-h2g", f"{work}/guest/lat-h2g"
    else:
        src, dst = f"{work}/guest/lat-g2h", f"{work}/host/lat-g2h"
    data = rng.randbytes(FILE_BYTES)
    name = f"s{time.monotonic_ns()}.txt"
    start = time.perf_counter()
    with open(f"{src}/{name}", "wb") as f:
        f.write(data)
    while True:
        try:
            with open(f"{dst}/{name}", "rb") as f:
                if f.read() == data:
                    return time.perf_counter() - start
        except FileNotFoundError:
            pass
        if time.perf_counter() - start > SAMPLE_TIMEOUT_S:
            raise RuntimeError(f"{name} did not arrive in {dst}")
        time.sleep(0.00005)


def main():
    if len(sys.argv) not in (3, 4):
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        sys.exit(2)
    builds = {"base": sys.argv[1], "new": sys.argv[2]}
    samples = int(sys.argv[3]) if len(sys.argv) == 4 else 200
    root = tempfile.mkdtemp(prefix="vmsync-latency-ab-", dir=os.environ.get("BENCH_DIR"))
    procs = []
    rng = random.Random(1)
    results = {(b, d): [] for b in builds for d in ("host->guest", "guest->host")}
    try:
        for name, bindir in builds.items():
            start_pair(f"{root}/{name}", bindir, procs)
        time.sleep(1)
        for i in range(WARMUP + samples):
            for direction in ("host->guest", "guest->host"):
                order = list(builds) if i % 2 == 0 else list(reversed(builds))
                for b in order:
                    seconds = sample(f"{root}/{b}", direction, rng)
                    if i >= WARMUP:
                        results[(b, direction)].append(seconds * 1000)
                    time.sleep(GAP_S)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        shutil.rmtree(root, ignore_errors=True)
    print(f"latency A/B: {samples} samples per build and direction, interleaved, "
          f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}")
    for direction in ("host->guest", "guest->host"):
        line = f"{direction:<12}"
        for b in builds:
            v = results[(b, direction)]
            line += (f"  {b} p50 {statistics.median(v):5.2f} p90 {percentile(v, 90):5.2f} "
                     f"p99 {percentile(v, 99):5.2f} ms")
        ratio = statistics.median(results[("new", direction)]) / statistics.median(
            results[("base", direction)])
        print(f"{line}  new/base p50 {ratio:.2f}")


if __name__ == "__main__":
    main()
