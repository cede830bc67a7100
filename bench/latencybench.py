#!/usr/bin/env python3
"""vmsync live-sync benchmark. Python 3 standard library only.

Normally started by bench/latency-bench.sh, which installs lsyncd, rsync and inotify-tools,
builds the release agents and passes --bin-dir. It prints figures; it asserts nothing about
time (a broken sync, a wrong byte or a sample that never lands still fail the run).

  python3 bench/latencybench.py --bin-dir target/release [--keep] [--no-lsyncd]

What runs, in one temporary directory (removed at the end unless --keep):

  vmsync-guest and vmsync-host (release) over a Unix socket, two shares: `src` (two-way,
  ignore .git/) and `out` (guest-to-host).

  1. Edit-to-visible latency, SAMPLES each way (default 200): write a 1 KiB file (open, write,
     close; no fsync) on one side, then wait on the other side's directory with inotify
     (through ctypes: the watcher is this process, no pipe to another one in the path) for the
     file to appear, read it, and stop the clock only when the content matches. A short pause
     between samples keeps each one an isolated edit. Host->guest and guest->host.
  2. The same host->guest operation with lsyncd (rsync backend, delay = 0) between two local
     directories: the reference.
  3. A git branch switch differing in 1,000 files (600 changed, 200 deleted, 200 added) in the
     host's `src`: from starting `git checkout` until the guest's tree equals the host's
     (without .git). Both directions of the switch.
  4. A build-like burst: 10,000 new small files written in the guest's `out` as fast as
     possible; from the first write until the host has every one, content verified.
  5. Idle: with nothing changing, CPU seconds of each agent (utime+stime from /proc/PID/stat)
     over IDLE_SECS (default 30), and RSS (VmRSS, VmHWM).

Environment: SAMPLES (default 200), IDLE_SECS (default 30), WARMUP (default 5 unreported
samples per direction), GAP_MS (pause between samples, default 10), BENCH_DIR (parent of the
temporary directory), SAMPLE_TIMEOUT (seconds a sample may take before the run fails, default
10), WRITE_MODE (`direct`, the default: open, write, close; `atomic`: a temp file renamed into
place, as editors save), EXTRA_FILES (default 0: that many more 200-byte files in the host's
tree before the start, 100 a directory, to see what a big share costs a live edit).
"""

import argparse
import ctypes
import json
import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

SAMPLES = int(os.environ.get("SAMPLES", "200"))
IDLE_SECS = float(os.environ.get("IDLE_SECS", "30"))
WARMUP = int(os.environ.get("WARMUP", "5"))
GAP_MS = float(os.environ.get("GAP_MS", "10"))
SAMPLE_TIMEOUT = float(os.environ.get("SAMPLE_TIMEOUT", "10"))
# "direct" (open, write, close: the operation) or "atomic" (temp file + rename).
WRITE_MODE = os.environ.get("WRITE_MODE", "direct")
EXTRA_FILES = int(os.environ.get("EXTRA_FILES", "0"))
BIG_TIMEOUT = 300.0
STOP_TIMEOUT = 10.0
FILE_BYTES = 1024

BURST_DIRS = 100
BURST_FILES_PER_DIR = 100
GIT_FILES = 1000

CLK_TCK = os.sysconf("SC_CLK_TCK")

IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_Q_OVERFLOW = 0x00004000
EVENT_HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def log(message):
    print(f"latency-bench: {message}", file=sys.stderr, flush=True)


def _die_with_parent():
    # The agents must not outlive the benchmark if it is killed with SIGKILL.
    _libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Processes:
    """Every process this run started, stopped by PID with bounded waits."""

    def __init__(self):
        self.running = []

    def start(self, name, argv, log_path, env=None):
        log_file = open(log_path, "ab")
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                   stderr=subprocess.STDOUT, env=env,
                                   preexec_fn=_die_with_parent)
        log_file.close()
        self.running.append((name, process))
        return process

    def stop(self, process):
        for entry in list(self.running):
            if entry[1] is process:
                self.running.remove(entry)
                stop_process(*entry)

    def stop_all(self):
        while self.running:
            stop_process(*self.running.pop())


def stop_process(name, process):
    if process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {process.pid}) ignored SIGTERM for {STOP_TIMEOUT:.0f} s; killing it")
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)
    except ProcessLookupError:
        pass


class Inotify:
    """A minimal inotify watcher over ctypes (libc's inotify_init1 / inotify_add_watch)."""

    def __init__(self):
        self.fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)

    def watch(self, directory):
        wd = _libc.inotify_add_watch(self.fd, os.fsencode(directory),
                                     IN_CLOSE_WRITE | IN_MOVED_TO | IN_CREATE)
        if wd < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {directory}")

    def drain(self):
        while self.events(0):
            pass

    def events(self, timeout_s):
        """Names from the events that arrive within timeout_s (all of them, possibly none);
        None in the list stands for a queue overflow."""
        if not self.poller.poll(max(0, int(timeout_s * 1000))):
            return []
        try:
            data = os.read(self.fd, 1 << 16)
        except BlockingIOError:
            return []
        names, offset = [], 0
        while offset + EVENT_HEADER.size <= len(data):
            _, mask, _, length = EVENT_HEADER.unpack_from(data, offset)
            offset += EVENT_HEADER.size
            name = data[offset:offset + length].rstrip(b"\0")
            offset += length
            names.append(None if mask & IN_Q_OVERFLOW else name)
        return names

    def close(self):
        os.close(self.fd)


def read_or_none(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def one_sample(src_dir, dst_dir, name, inotify, rng):
    """Writes src_dir/name (1 KiB) and returns the seconds until dst_dir/name holds it."""
    data = rng.randbytes(FILE_BYTES)
    dst = os.path.join(dst_dir, name)
    inotify.drain()
    start = time.perf_counter()
    if WRITE_MODE == "atomic":
        # As an editor saves: the file appears complete, in one rename.
        tmp = os.path.join(src_dir, f".{name}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, os.path.join(src_dir, name))
    else:
        with open(os.path.join(src_dir, name), "wb") as f:
            f.write(data)
    deadline = start + SAMPLE_TIMEOUT
    while True:
        if read_or_none(dst) == data:
            return time.perf_counter() - start
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise RuntimeError(f"{name} did not arrive in {dst_dir} within {SAMPLE_TIMEOUT} s")
        # Any event (or 50 ms without one) sends us back to the check above: reading a
        # missing or partial file costs microseconds, and a filter on names could miss the
        # one that matters.
        inotify.events(min(remaining, 0.05))


def latency_run(label, src_root, dst_root, subdir, samples):
    """SAMPLES one-file edits from src_root/subdir to dst_root/subdir; returns seconds."""
    src_dir, dst_dir = os.path.join(src_root, subdir), os.path.join(dst_root, subdir)
    wait_until(lambda: os.path.isdir(dst_dir), BIG_TIMEOUT, f"{dst_dir} to exist")
    inotify = Inotify()
    inotify.watch(dst_dir)
    rng = random.Random(label)
    results = []
    try:
        for i in range(WARMUP + samples):
            seconds = one_sample(src_dir, dst_dir, f"s{i:04d}.txt", inotify, rng)
            if i >= WARMUP:
                results.append(seconds)
            time.sleep(GAP_MS / 1000)
    finally:
        inotify.close()
    log(f"{label}: {samples} samples done")
    return results


def percentile(values, p):
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def wait_until(predicate, timeout, what, poll=0.005):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def tree_stat(root, skip=(".vmsync", ".git")):
    """{relative path: (kind, size, mtime_ns, mode)} below root, without top-level `skip`."""
    out = {}
    for directory, dirs, files in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        if rel_dir == ".":
            dirs[:] = [d for d in dirs if d not in skip]
        for name in files + [d for d in dirs]:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            rel = os.path.normpath(os.path.join(rel_dir, name))
            out[rel] = (st.st_mode >> 12, st.st_size if not os.path.isdir(path) else 0,
                        st.st_mtime_ns if not os.path.isdir(path) else 0, st.st_mode & 0o7777)
    return out


def tree_content(root, skip=(".vmsync", ".git")):
    out = {}
    for rel, (kind, *_rest) in tree_stat(root, skip).items():
        path = os.path.join(root, rel)
        if os.path.islink(path):
            out[rel] = ("link", os.readlink(path))
        elif os.path.isfile(path):
            out[rel] = ("file", read_or_none(path))
        else:
            out[rel] = ("dir", None)
    return out


def verify_same(a, b, what):
    ta, tb = tree_content(a), tree_content(b)
    if ta != tb:
        diff = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))[:10]
        raise RuntimeError(f"{what}: trees differ after landing: {diff}")


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 (1-based) of the whole line; after the comm field
    # they are at index 11 and 12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_kib(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def git(repo, *args):
    subprocess.run(["git", "-C", repo, "-c", "user.name=t", "-c", "user.email=t@t",
                    "-c", "init.defaultBranch=main", "-c", "advice.detachedHead=false",
                    *args], check=True, stdout=subprocess.DEVNULL)


def make_repo(repo):
    """main with 1,000 files; feature differing from it in 1,000 files."""
    git(repo, "init", "-q")
    for i in range(GIT_FILES):
        write(os.path.join(repo, f"src/m{i % 20}/f{i}.rs"),
              (f"// file {i}\nfn f{i}() {{}}\n" * 10).encode())
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "main")
    git(repo, "checkout", "-q", "-b", "feature")
    for i in range(600):
        write(os.path.join(repo, f"src/m{i % 20}/f{i}.rs"),
              (f"// file {i}, feature\nfn f{i}() -> u32 {{ {i} }}\n" * 10).encode())
    for i in range(600, 800):
        os.remove(os.path.join(repo, f"src/m{i % 20}/f{i}.rs"))
    for i in range(200):
        write(os.path.join(repo, f"feature/new{i % 10}/n{i}.rs"), f"// new {i}\n".encode())
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "feature")
    git(repo, "checkout", "-q", "main")


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def arrived(root, expected, healthy):
    """A predicate for wait_until: root's stat tree equals expected; raises through
    `healthy` as soon as the share halts (a halted share will never land)."""
    def check():
        if {k: v[:3] for k, v in tree_stat(root).items()} == expected:
            return True
        healthy()
        return False
    return check


def branch_switch(host_src, guest_src, branch, healthy):
    """Seconds from starting `git checkout` until the guest's tree equals the host's."""
    start = time.perf_counter()
    git(host_src, "checkout", "-q", branch)
    git_done = time.perf_counter() - start
    expected = {k: v[:3] for k, v in tree_stat(host_src).items()}
    wait_until(arrived(guest_src, expected, healthy), BIG_TIMEOUT,
               f"the switch to {branch} to land")
    landed = time.perf_counter() - start
    verify_same(host_src, guest_src, f"switch to {branch}")
    return git_done, landed


def burst(guest_out, host_out, healthy):
    """Seconds to write 10,000 files in the guest, and until the host has all of them."""
    start = time.perf_counter()
    for d in range(BURST_DIRS):
        directory = os.path.join(guest_out, f"target/deps/d{d:03d}")
        os.makedirs(directory, exist_ok=True)
        for f in range(BURST_FILES_PER_DIR):
            with open(os.path.join(directory, f"o{f:03d}.o"), "wb") as out:
                out.write((f"object {d}/{f}\n" * (1 + (d * f) % 7)).encode())
    written = time.perf_counter() - start
    expected = {k: v[:3] for k, v in tree_stat(guest_out).items()}
    wait_until(arrived(host_out, expected, healthy), BIG_TIMEOUT, "the burst to land",
               poll=0.02)
    landed = time.perf_counter() - start
    verify_same(guest_out, host_out, "burst")
    return written, landed


class Vmsync:
    def __init__(self, bin_dir, work, processes):
        self.bin_dir, self.work, self.processes = bin_dir, work, processes
        self.host_src = os.path.join(work, "host/src")
        self.guest_src = os.path.join(work, "guest/src")
        self.host_out = os.path.join(work, "host/out")
        self.guest_out = os.path.join(work, "guest/out")
        for d in (self.host_src, self.guest_src, self.host_out, self.guest_out):
            os.makedirs(d)
        self.guest_toml = os.path.join(work, "guest.toml")
        self.host_toml = os.path.join(work, "host.toml")
        with open(self.guest_toml, "w") as f:
            f.write(f'listen = "unix:{work}/guest.sock"\nstate_dir = "{work}/guest-state"\n'
                    f'control = "{work}/guest.ctl"\n'
                    f'[[share]]\nname = "src"\npath = "{self.guest_src}"\n'
                    f'[[share]]\nname = "out"\npath = "{self.guest_out}"\n')
        with open(self.host_toml, "w") as f:
            f.write(f'guest = "unix:{work}/guest.sock"\nstate_dir = "{work}/host-state"\n'
                    f'control = "{work}/host.ctl"\n'
                    f'[[share]]\nname = "src"\npath = "{self.host_src}"\n'
                    f'ignore = [".git/"]\n'
                    f'[[share]]\nname = "out"\npath = "{self.host_out}"\n'
                    f'mode = "guest-to-host"\n')
        self.guest = self.host = None

    def binary(self, name):
        path = os.path.join(self.bin_dir, name)
        if not os.access(path, os.X_OK):
            raise RuntimeError(f"{path} is not built")
        return path

    def start(self):
        env = dict(os.environ)
        env.setdefault("VMSYNC_LOG", "info")
        self.guest = self.processes.start(
            "vmsync-guest", [self.binary("vmsync-guest"), "run", "--config", self.guest_toml],
            os.path.join(self.work, "guest.log"), env)
        wait_until(lambda: os.path.exists(f"{self.work}/guest.sock"), 30, "the guest socket")
        self.host = self.processes.start(
            "vmsync-host", [self.binary("vmsync-host"), "run", "--config", self.host_toml],
            os.path.join(self.work, "host.log"), env)
        self.wait()

    def healthy(self):
        """Raises if a share is halted or conflicted (checked at most once a second)."""
        now = time.monotonic()
        if now - getattr(self, "_checked", 0) < 1:
            return
        self._checked = now
        out = subprocess.run([self.binary("vmsync-host"), "status", "--json", "--config",
                              self.host_toml], capture_output=True)
        try:
            shares = json.loads(out.stdout)["shares"]
        except (ValueError, KeyError):
            return
        for share in shares:
            if share.get("state") in ("halted", "conflicted"):
                raise RuntimeError(f"share {share.get('name')} is {share.get('state')}: "
                                   f"{share.get('halt_reason') or share.get('conflicts')}")

    def wait(self):
        out = subprocess.run([self.binary("vmsync-host"), "wait", "--config", self.host_toml,
                              "--timeout", "120"], capture_output=True)
        if out.returncode != 0:
            raise RuntimeError(f"vmsync-host wait exited {out.returncode}: "
                               f"{out.stderr.decode(errors='replace')}")


class Lsyncd:
    def __init__(self, work, processes):
        self.work, self.processes = work, processes
        self.src = os.path.join(work, "lsyncd/src")
        self.dst = os.path.join(work, "lsyncd/dst")
        os.makedirs(os.path.join(self.src, "lat"))
        os.makedirs(self.dst)
        self.config = os.path.join(work, "lsyncd.lua")
        with open(self.config, "w") as f:
            f.write(f'settings {{ logfile = "{work}/lsyncd.log", nodaemon = true, '
                    f'insist = true }}\n'
                    f'sync {{ default.rsync, source = "{self.src}", target = "{self.dst}", '
                    f'delay = 0 }}\n')
        self.process = None

    def start(self):
        self.process = self.processes.start(
            "lsyncd", ["lsyncd", "-nodaemon", self.config], os.path.join(self.work, "lsyncd.out"))
        # lsyncd copies the tree once at startup before it watches; the lat/ directory arriving
        # is that initial copy done.
        wait_until(lambda: os.path.isdir(os.path.join(self.dst, "lat")), 60, "lsyncd startup")


def fmt_ms(seconds):
    return f"{seconds * 1000:8.2f}"


def latency_row(label, values):
    return (f"{label:<22} {len(values):>7} {fmt_ms(percentile(values, 50))} "
            f"{fmt_ms(percentile(values, 90))} {fmt_ms(percentile(values, 99))} "
            f"{fmt_ms(max(values))} {fmt_ms(sum(values) / len(values))}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bin-dir", required=True)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-lsyncd", action="store_true")
    args = parser.parse_args()

    processes = Processes()
    work = tempfile.mkdtemp(prefix="vmsync-latency-", dir=os.environ.get("BENCH_DIR"))

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        log(f"work directory {work}")
        load_start = loadavg()
        vm = Vmsync(args.bin_dir, work, processes)
        make_repo(vm.host_src)
        os.makedirs(os.path.join(vm.host_src, "lat-h2g"))
        os.makedirs(os.path.join(vm.guest_src, "lat-g2h"))
        for i in range(EXTRA_FILES):
            write(os.path.join(vm.host_src, f"bulk/d{i // 100:04d}/f{i:06d}.txt"),
                  f"extra file {i}\n".encode() * 12)
        if EXTRA_FILES:
            log(f"{EXTRA_FILES} extra files in the host's tree")
        vm.start()
        log("agents in sync")

        rows = []
        h2g = latency_run("vmsync host->guest", vm.host_src, vm.guest_src, "lat-h2g", SAMPLES)
        rows.append(latency_row("vmsync host->guest", h2g))
        g2h = latency_run("vmsync guest->host", vm.guest_src, vm.host_src, "lat-g2h", SAMPLES)
        rows.append(latency_row("vmsync guest->host", g2h))

        ls = None
        if not args.no_lsyncd:
            ls = Lsyncd(work, processes)
            ls.start()
            ref = latency_run("lsyncd host->guest", ls.src, ls.dst, "lat", SAMPLES)
            rows.append(latency_row("lsyncd (rsync, delay 0)", ref))

        # A phase that fails (a halt, a timeout) is reported in its line and the run goes on,
        # so the other figures still come out; the exit status says something failed.
        failures = []
        switches = []
        for branch in ("feature", "main"):
            try:
                switches.append((branch, *branch_switch(vm.host_src, vm.guest_src, branch,
                                                        vm.healthy)))
            except RuntimeError as e:
                failures.append(f"git checkout {branch}: {e}")
                break
        log("branch switches done")
        try:
            burst_written, burst_landed = burst(vm.guest_out, vm.host_out, vm.healthy)
        except RuntimeError as e:
            failures.append(f"burst: {e}")
            burst_written = burst_landed = None
        log("burst done")
        try:
            vm.wait()
        except RuntimeError as e:
            failures.append(f"settling before the idle phase: {e}")

        pids = {"vmsync-host": vm.host.pid, "vmsync-guest": vm.guest.pid}
        if ls is not None:
            pids["lsyncd"] = ls.process.pid
        log(f"idle for {IDLE_SECS:g} s")
        before = {n: cpu_seconds(p) for n, p in pids.items()}
        time.sleep(IDLE_SECS)
        idle = {n: cpu_seconds(p) - before[n] for n, p in pids.items()}
        memory = {n: memory_kib(p) for n, p in pids.items()}

        # Other work on the machine skews every figure here; say how busy it was.
        print(f"load average at start: {load_start}, at end: {loadavg()}")
        print(f"vmsync live-sync benchmark: {os.cpu_count()} CPUs, Unix socket, "
              f"{FILE_BYTES} B files ({WRITE_MODE} writes), {SAMPLES} samples per direction "
              f"(+{WARMUP} warm-up), {GAP_MS:g} ms between samples"
              + (f", {EXTRA_FILES} extra files in the share" if EXTRA_FILES else ""))
        print()
        print(f"{'edit-to-visible':<22} {'samples':>7} {'p50 ms':>8} {'p90 ms':>8} "
              f"{'p99 ms':>8} {'max ms':>8} {'mean ms':>8}")
        print("-" * 76)
        for row in rows:
            print(row)
        print()
        for branch, git_s, landed_s in switches:
            print(f"git checkout {branch:<8} (1,000 files differ): git took {git_s:6.3f} s, "
                  f"landed in the guest after {landed_s:6.3f} s")
        if burst_landed is not None:
            print(f"burst of 10,000 files in the guest (guest-to-host): written in "
                  f"{burst_written:6.3f} s, all on the host after {burst_landed:6.3f} s")
        print()
        print(f"idle over {IDLE_SECS:g} s:")
        for name in pids:
            m = memory[name]
            print(f"  {name:<13} CPU {idle[name]:6.3f} s ({100 * idle[name] / IDLE_SECS:5.2f} %)"
                  f"  RSS {m.get('VmRSS', 0) / 1024:6.1f} MiB  peak {m.get('VmHWM', 0) / 1024:6.1f}"
                  f" MiB")
        for failure in failures:
            print(f"FAILED: {failure}")
        sys.stdout.flush()
        if failures:
            sys.exit(1)
    finally:
        processes.stop_all()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
