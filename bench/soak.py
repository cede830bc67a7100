#!/usr/bin/env python3
"""vmsync soak benchmark: memory and CPU of both agents under hours of live churn.
Python 3 standard library only.

Normally started by bench/soak.sh, which builds the release agents and passes --bin-dir.

  python3 bench/soak.py --bin-dir target/release [--keep] MINUTES

What runs, in one temporary directory (removed at the end unless --keep):

  vmsync-guest and vmsync-host over a Unix socket, one two-way share of FILES files (default
  2,000: half made on the host under h/, half in the guest under g/, 20 a directory) that both
  agents sync in an initial cycle. Then for MINUTES minutes this process changes both sides at
  OPS_PER_SEC (default 48) operations a second, alternating host and guest, chosen with a seeded
  RNG (SEED, printed): create a file, overwrite part of one in place, append to one, delete one,
  rename one (often into another directory), make a directory with a few files, rename a
  directory, delete a directory. The host changes only h/ and the guest only g/, so no change
  is a conflict and the end state is known; the file count of each side stays near its start.

  Every minute it prints both agents' RSS (VmRSS from /proc/PID/status), the operations so far,
  and the CPU seconds (utime+stime from /proc/PID/stat) each agent spent per 1,000 operations
  over that minute. At the end it stops changing, waits for `vmsync-host wait`, and compares the
  trees (types, contents, file modes; `.vmsync/` left out): PASS or FAIL. It also says whether
  each agent's RSS at the end is within 10 % of its value at minute 5 (runs of 6 minutes and
  longer).

Environment: SEED (default: from the clock), OPS_PER_SEC (48), FILES (2000), BENCH_DIR (parent
of the temporary directory), WAIT_TIMEOUT (seconds for the final convergence, default 600),
HOST_WRAPPER / GUEST_WRAPPER (a command put in front of the agent, e.g. `heaptrack -o FILE`:
a profiler that runs the program in the same process, so /proc/PID is still the agent's).
MALLOC_ARENA_MAX and VMSYNC_LOG are passed through to the agents.
"""

import argparse
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import ctypes

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT = 10.0
RSS_TOLERANCE = 0.10
RSS_REFERENCE_MINUTE = 5
FILES_PER_DIR = 20
SMALL_DIR_FILES = 8
MAX_FILE_BYTES = 16 * 1024

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def log(message):
    print(f"soak: {message}", file=sys.stderr, flush=True)


def _die_with_parent():
    # The agents must not outlive the benchmark if it is killed with SIGKILL.
    _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Processes:
    """Every process this run started, stopped by PID with bounded waits."""

    def __init__(self):
        self.running = []
        # Agents started behind a wrapper (a profiler script): signalled themselves first,
        # since a wrapper need not pass SIGTERM on.
        self.wrapped = []

    def start(self, name, argv, log_path, env):
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT, env=env,
                                       preexec_fn=_die_with_parent)
        self.running.append((name, process))
        return process

    def adopt(self, process, pid):
        if pid != process.pid:
            self.wrapped.append(pid)

    def stop_all(self):
        while self.wrapped:
            pid = self.wrapped.pop()
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.monotonic() + STOP_TIMEOUT * 6
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                            break
                except OSError:
                    break
                time.sleep(0.1)
        while self.running:
            name, process = self.running.pop()
            if process.poll() is not None:
                continue
            try:
                process.send_signal(signal.SIGTERM)
                # A profiler wrapper writes its data at exit: give it longer.
                process.wait(timeout=STOP_TIMEOUT * 6)
            except subprocess.TimeoutExpired:
                log(f"{name} (pid {process.pid}) ignored SIGTERM; killing it")
                process.kill()
                process.wait(timeout=STOP_TIMEOUT)
            except ProcessLookupError:
                pass


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the line; after the comm field, index 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "VmRSS":
                return int(value.split()[0])
    return 0


def agent_pid(process, binary, timeout=30.0):
    """The pid of `binary` started by `process`: itself, or (behind a wrapper such as heaptrack,
    which is a script) the descendant running it."""
    binary = os.path.realpath(binary)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        todo, seen = [process.pid], set()
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            try:
                if os.path.realpath(f"/proc/{pid}/exe") == binary:
                    return pid
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"no process runs {binary} under pid {process.pid}")


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def tree(root):
    """{relative path: (kind, mode, content)} below root, `.vmsync/` left out."""
    out = {}
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        if rel_dir == ".":
            dirs[:] = [d for d in dirs if d != ".vmsync"]
        for name in files + dirs:
            path = os.path.join(directory, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if os.path.islink(path):
                out[rel] = ("link", 0, os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir", st.st_mode & 0o7777, None)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", st.st_mode & 0o7777, f.read())
    return out


class Side:
    """One side's own subtree (h/ or g/) and what this process knows is in it."""

    def __init__(self, root, prefix, rng):
        self.root, self.prefix, self.rng = root, prefix, rng
        self.dirs = {}  # relative dir -> set of file names
        self.counter = 0

    def fresh(self, kind):
        self.counter += 1
        return f"{kind}{self.counter:07d}"

    def path(self, *parts):
        return os.path.join(self.root, self.prefix, *parts)

    def content(self):
        size = int(self.rng.lognormvariate(7, 1.5)) % MAX_FILE_BYTES
        if self.rng.random() < 0.8:
            line = f"{self.prefix} {self.counter} {self.rng.random():.12f} soak line\n".encode()
            return (line * (size // len(line) + 1))[:size]
        return self.rng.randbytes(size)

    def write(self, d, name, data):
        with open(self.path(d, name), "wb") as f:
            f.write(data)

    def populate(self, files):
        for i in range(files):
            d = f"d{i // FILES_PER_DIR:04d}"
            if d not in self.dirs:
                os.makedirs(self.path(d))
                self.dirs[d] = set()
            name = self.fresh("f")
            self.write(d, name, self.content())
            self.dirs[d].add(name)

    def file_count(self):
        return sum(len(names) for names in self.dirs.values())

    def random_file(self):
        candidates = [d for d, names in self.dirs.items() if names]
        if not candidates:
            return None, None
        d = self.rng.choice(candidates)
        return d, self.rng.choice(sorted(self.dirs[d]))

    def op(self, target_files, target_dirs):
        """One random operation; returns its name."""
        rng = self.rng
        files = self.file_count()
        # Keep the count near its start: more creates below it, more deletes above it.
        bias = 0.1 if files < target_files else -0.1
        r = rng.random()
        if r < 0.22 + bias or not self.dirs:
            if not self.dirs:
                self.dirs["d-root"] = set()
                os.makedirs(self.path("d-root"), exist_ok=True)
            d = rng.choice(sorted(self.dirs))
            name = self.fresh("f")
            self.write(d, name, self.content())
            self.dirs[d].add(name)
            return "create"
        d, name = self.random_file()
        if name is None:
            return "none"
        path = self.path(d, name)
        if r < 0.42:
            size = os.path.getsize(path)
            with open(path, "r+b") as f:
                f.seek(rng.randrange(size + 1))
                f.write(rng.randbytes(rng.randint(1, 256)))
            return "edit"
        if r < 0.55:
            with open(path, "ab") as f:
                f.write(f"appended {rng.random()}\n".encode() * rng.randint(1, 20))
            return "append"
        if r < 0.73 - bias:
            os.unlink(path)
            self.dirs[d].discard(name)
            return "delete"
        if r < 0.90:
            to = rng.choice(sorted(self.dirs)) if rng.random() < 0.5 else d
            new = self.fresh("f")
            os.rename(path, self.path(to, new))
            self.dirs[d].discard(name)
            self.dirs[to].add(new)
            return "rename"
        # Directories: made and deleted alike, so their number stays near its start too.
        dirs = len(self.dirs)
        if r < 0.93 and dirs < target_dirs + 5 or r >= 0.96 and dirs < target_dirs - 5:
            nd = self.fresh("d")
            os.makedirs(self.path(nd))
            self.dirs[nd] = set()
            for _ in range(rng.randint(1, 5)):
                n = self.fresh("f")
                self.write(nd, n, self.content())
                self.dirs[nd].add(n)
            return "mkdir"
        if 0.93 <= r < 0.96:
            nd = self.fresh("d")
            os.rename(self.path(d), self.path(nd))
            self.dirs[nd] = self.dirs.pop(d)
            return "rename-dir"
        # Delete a whole directory: the one with the fewest files (typically one made by
        # "mkdir" above), and only a small one, so the benchmark never deletes enough within a
        # minute to trip the mass-deletion halt (`docs/safety.md`).
        if len(self.dirs) > 1:
            x = min(sorted(self.dirs), key=lambda k: len(self.dirs[k]))
            if len(self.dirs[x]) <= SMALL_DIR_FILES:
                shutil.rmtree(self.path(x))
                del self.dirs[x]
                return "rmdir"
        return "none"


def agent_env(extra):
    env = dict(os.environ)
    env.setdefault("VMSYNC_LOG", "warn")
    env.update(extra)
    return env


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("minutes", type=float)
    args = parser.parse_args()

    seed = int(os.environ.get("SEED", str(int(time.time()))))
    ops_per_sec = float(os.environ.get("OPS_PER_SEC", "48"))
    files = int(os.environ.get("FILES", "2000"))
    wait_timeout = int(os.environ.get("WAIT_TIMEOUT", "600"))
    rng = random.Random(seed)

    def binary(name):
        path = os.path.join(args.bin_dir, name)
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"{path} is not built")
        return path

    processes = Processes()
    work = tempfile.mkdtemp(prefix="vmsync-soak-", dir=os.environ.get("BENCH_DIR"))

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    failed = []
    try:
        log(f"work directory {work}")
        print(f"soak: seed {seed}, {files} files, {ops_per_sec:g} ops/s, {args.minutes:g} min, "
              f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset (the agents use 1)')}, "
              f"load average {loadavg()}", flush=True)
        host_root, guest_root = f"{work}/host/share", f"{work}/guest/share"
        os.makedirs(host_root)
        os.makedirs(guest_root)
        host = Side(host_root, "h", random.Random(rng.random()))
        guest = Side(guest_root, "g", random.Random(rng.random()))
        host.populate(files // 2)
        guest.populate(files - files // 2)
        dirs_each = len(host.dirs)
        guest_toml, host_toml = f"{work}/guest.toml", f"{work}/host.toml"
        with open(guest_toml, "w") as f:
            f.write(f'listen = "unix:{work}/guest.sock"\nstate_dir = "{work}/guest-state"\n'
                    f'control = "{work}/guest.ctl"\n'
                    f'[[share]]\nname = "soak"\npath = "{guest_root}"\n')
        with open(host_toml, "w") as f:
            f.write(f'guest = "unix:{work}/guest.sock"\nstate_dir = "{work}/host-state"\n'
                    f'control = "{work}/host.ctl"\n'
                    f'[[share]]\nname = "soak"\npath = "{host_root}"\nmode = "two-way"\n')
        env = agent_env({})
        guest_p = processes.start(
            "vmsync-guest",
            shlex.split(os.environ.get("GUEST_WRAPPER", ""))
            + [binary("vmsync-guest"), "run", "--config", guest_toml],
            f"{work}/guest.log", env)
        deadline = time.monotonic() + 60
        while not os.path.exists(f"{work}/guest.sock"):
            if time.monotonic() > deadline or guest_p.poll() is not None:
                raise RuntimeError("the guest agent did not listen")
            time.sleep(0.05)
        host_p = processes.start(
            "vmsync-host",
            shlex.split(os.environ.get("HOST_WRAPPER", ""))
            + [binary("vmsync-host"), "run", "--config", host_toml],
            f"{work}/host.log", env)

        def wait(timeout):
            out = subprocess.run([binary("vmsync-host"), "wait", "--config", host_toml,
                                  "--timeout", str(timeout)], capture_output=True)
            return out.returncode

        def state():
            out = subprocess.run([binary("vmsync-host"), "status", "--json", "--config",
                                  host_toml], capture_output=True)
            try:
                share = json.loads(out.stdout)["shares"][0]
                return share.get("state"), share.get("halt_reason") or share.get("conflicts")
            except (ValueError, KeyError, IndexError):
                return "unknown", out.stderr.decode(errors="replace").strip()

        rc = wait(wait_timeout)
        if rc != 0:
            raise RuntimeError(f"initial sync: vmsync-host wait exited {rc}")
        log("initial sync done")

        pids = {"host": agent_pid(host_p, binary("vmsync-host")),
                "guest": agent_pid(guest_p, binary("vmsync-guest"))}
        processes.adopt(host_p, pids["host"])
        processes.adopt(guest_p, pids["guest"])
        print(f"{'minute':>6} {'ops':>8} {'host RSS MiB':>12} {'guest RSS MiB':>13} "
              f"{'host CPU s/1k ops':>17} {'guest CPU s/1k ops':>18}  state", flush=True)
        rss = {0: {n: rss_kib(p) for n, p in pids.items()}}
        print(f"{0:>6} {0:>8} {rss[0]['host'] / 1024:>12.1f} {rss[0]['guest'] / 1024:>13.1f} "
              f"{'':>17} {'':>18}  in sync", flush=True)
        cpu_prev = {n: cpu_seconds(p) for n, p in pids.items()}
        cpu_start = dict(cpu_prev)
        ops, ops_prev = 0, 0
        counts = {}
        start = time.monotonic()
        minutes = int(args.minutes)
        end = start + args.minutes * 60
        next_report = start + 60
        minute = 0
        sides = (host, guest)
        while True:
            now = time.monotonic()
            if now >= next_report:
                minute += 1
                for name, p in (("host", host_p), ("guest", guest_p)):
                    if p.poll() is not None:
                        raise RuntimeError(f"vmsync-{name} exited with {p.returncode}")
                cpu = {n: cpu_seconds(p) for n, p in pids.items()}
                rss[minute] = {n: rss_kib(p) for n, p in pids.items()}
                done = max(ops - ops_prev, 1)
                per_k = {n: (cpu[n] - cpu_prev[n]) * 1000 / done for n in pids}
                st, why = state()
                if st in ("halted", "conflicted"):
                    failed.append(f"minute {minute}: share {st}: {why}")
                print(f"{minute:>6} {ops:>8} {rss[minute]['host'] / 1024:>12.1f} "
                      f"{rss[minute]['guest'] / 1024:>13.1f} {per_k['host']:>17.3f} "
                      f"{per_k['guest']:>18.3f}  {st}", flush=True)
                cpu_prev, ops_prev = cpu, ops
                next_report += 60
                if minute >= minutes:
                    break
            if now >= end:
                break
            due = start + ops / ops_per_sec
            if due > now:
                time.sleep(min(due - now, next_report - now))
                continue
            side = sides[ops % 2]
            kind = side.op(files // 2, dirs_each)
            counts[kind] = counts.get(kind, 0) + 1
            ops += 1

        elapsed = time.monotonic() - start
        cpu_end = {n: cpu_seconds(p) for n, p in pids.items()}
        print(f"soak: {ops} operations in {elapsed:.0f} s ({ops / max(elapsed, 1):.1f}/s): "
              + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), flush=True)
        for n in pids:
            print(f"soak: {n} CPU over the churn {cpu_end[n] - cpu_start[n]:.1f} s, "
                  f"{(cpu_end[n] - cpu_start[n]) * 1000 / max(ops, 1):.3f} s per 1,000 operations")

        converge_start = time.monotonic()
        rc = wait(wait_timeout)
        converged = time.monotonic() - converge_start
        final = {n: rss_kib(p) for n, p in pids.items()}
        if rc != 0:
            st, why = state()
            failed.append(f"vmsync-host wait exited {rc} (state {st}: {why})")
        else:
            log(f"converged {converged:.1f} s after the churn stopped")
            th, tg = tree(host_root), tree(guest_root)
            if th != tg:
                diff = sorted(k for k in set(th) | set(tg) if th.get(k) != tg.get(k))
                failed.append(f"trees differ in {len(diff)} paths, first: {diff[:5]}")
            else:
                print(f"soak: trees identical: {len(th)} entries "
                      f"({sum(1 for v in th.values() if v[0] == 'file')} files)")
        print(f"soak: RSS after convergence: host {final['host'] / 1024:.1f} MiB, "
              f"guest {final['guest'] / 1024:.1f} MiB")
        last = max(rss)
        if last > RSS_REFERENCE_MINUTE:
            for n in pids:
                ref, now_kib = rss[RSS_REFERENCE_MINUTE][n], rss[last][n]
                change = (now_kib - ref) / ref
                verdict = "within" if abs(change) <= RSS_TOLERANCE else "NOT within"
                print(f"soak: {n} RSS at minute {last} {now_kib / 1024:.1f} MiB vs minute "
                      f"{RSS_REFERENCE_MINUTE} {ref / 1024:.1f} MiB: {change * 100:+.1f} %, "
                      f"{verdict} 10 %")
        else:
            print(f"soak: RSS check needs a run longer than {RSS_REFERENCE_MINUTE} minutes")
        print(f"soak: load average at end {loadavg()}")
        for f in failed:
            print(f"soak: FAILED: {f}")
        print("soak: PASS" if not failed else "soak: FAIL", flush=True)
    finally:
        processes.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
