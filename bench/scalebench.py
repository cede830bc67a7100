#!/usr/bin/env python3
"""vmsync at scale: big shares, a big file, a fleet of agent pairs. Python 3 standard library only.

Normally started by bench/scale-bench.sh, which installs rsync, builds the release binaries and
passes --bin-dir. Usage:

  scalebench.py [--bin-dir DIR] [--keep] [--vmsync-only] [--json FILE] [CASE...]
  scalebench.py heap FILE.zst [leaked|peak] [TOP] [FILES]   allocation sites of a heaptrack
                profile, grouped by the innermost frame in vmsync's code (what an agent killed
                at rest held: "leaked"; at its heap peak: "peak"); with FILES, bytes per file

Cases (default: every one but `million`):

  files200k  200,000 small files (64-2,048 bytes, 100 a directory, 2,000 directories in 40)
  million    1,000,000 small files, the same shape (10,000 directories in 100)
  standard   bench/sync-bench.sh at full scale (SCALE=1), with each agent's peak RSS
  bigfile    one BIGFILE_GIB (20) GiB file of incompressible bytes: initial sync, then 1 MiB
             inserted in its middle; bytes on the wire through vmsync-relay, peak RSS per agent
  fleet      FLEET (20) agent pairs (a vmsync-host per vmsync-guest), FLEET_FILES (200) files
             each, all in sync and idle: RSS / PSS of each, CPU of all over FLEET_IDLE_SECS (30)

A file-count case (files200k, million, or FILES=N for a case named files<N>) runs, in order:
  vmsync initial   guest and host started on an empty guest directory; wall until
                   `vmsync-host wait` returns; CPU per agent (/proc/PID/stat); peak RSS per agent
                   (VmHWM); then REST_SECS (10) idle and the RSS at rest (VmRSS, smaps_rollup,
                   threads, the resident memory by mapping kind from /proc/PID/smaps), and
                   again REST_LONG_SECS (60) later, past the 60 s each side remembers what
                   its transitions wrote
  vmsync no-op     `vmsync-host sync` with nothing changed (both agents' peaks reset first)
  latency          LATENCY_SAMPLES (50) 1 KiB files written on the host (open, write, close),
                   each timed until the guest's copy holds the same bytes (inotify, through
                   bench/latencybench.py's helper), after 5 unreported ones; then removed again
  vmsync restart   both agents stopped (SIGTERM) and started again; wall from starting the
                   guest until `vmsync-host wait` returns (a full cycle on a synced share, with
                   the state each side kept); then REST_SECS idle and the RSS at rest again
  rsync initial    `rsync -a --delete` to an rsync daemon on 127.0.0.1 (own rsyncd.conf, a free
                   port), into an empty directory; then the no-op re-run; then `--fsync`
                   (rsync 3.2.4 and later) into another empty directory through a second daemon.
                   CPU: the client (wait4) and the daemon's children (its cutime/cstime once
                   reaped); peak RSS: VmHWM of each rsync process sampled every 10 ms, summed,
                   reported as client (the sender) / daemon side (the receiver).
Every destination is compared with the source (bench/syncbench.py's manifest: types, modes,
sizes, SHA-1, mtimes; VERIFY=0 skips it). `sync(2)` runs (untimed) before each initial sync.
vmsync uses the share mode MODE (default two-way) and talks over a Unix socket directly (the
bigfile case: through vmsync-relay, which counts the bytes).

HOST_WRAPPER / GUEST_WRAPPER put a command in front of an agent (e.g. "heaptrack -o FILE"). With
either set, a file-count case stops after the at-rest measurement of the initial sync and kills
both agents with SIGKILL, so a heap profiler records what was allocated at rest as "leaked"; the
wrapper is then given WRAPPER_EXIT_TIMEOUT (600) s to finish writing. RSS then includes the
profiler's own. With WRAP_PHASE=restart, the agents of the initial sync run plain and those
started for the restart run under the wrappers, killed so at rest after it (the profile of the
full cycle on a synced share that a restart runs).

Environment: BENCH_DIR (parent of the temporary work directory; default $TMPDIR or /tmp), SEED,
FILES, SOURCE_DIR (a file-count case's source tree: made there if missing, reused if present,
never removed; deleting 200,000 files takes minutes on a disk mounted with `discard`), MODE,
REST_SECS, REST_LONG_SECS, LATENCY_SAMPLES, VERIFY, BIGFILE_GIB, FLEET, FLEET_FILES,
FLEET_IDLE_SECS, STANDARD_SCALE (the standard case's SCALE, default 1), BENCH_TIMEOUT (bound on
any single phase, default 3600), MALLOC_ARENA_MAX and VMSYNC_LOG (passed to the agents).
"""

import json
import os
import platform
import random
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import syncbench as sb  # noqa: E402  (processes, rsync daemon, manifests, timing)
from syncbench import BenchError, fmt_bytes, log  # noqa: E402

MIB = 1 << 20
GIB = 1 << 30
DEFAULT_CASES = ("files200k", "standard", "bigfile", "fleet")
ALL_CASES = ("files200k", "million", "standard", "bigfile", "fleet")
FILES_PER_DIR = 100
SMALL_MIN, SMALL_MAX = 64, 2048
STOP_TIMEOUT_S = 10
INSERT_BYTES = 1 * MIB
BLOCK = 4 * MIB
LATENCY_WARMUP = 5
LATENCY_GAP_S = 0.01


def env_int(name, default):
    try:
        return int(os.environ.get(name, default))
    except ValueError as error:
        raise BenchError(f"{name}: {error}") from error


def env_float(name, default):
    try:
        return float(os.environ.get(name, default))
    except ValueError as error:
        raise BenchError(f"{name}: {error}") from error


# --------------------------------------------------------------------------------------------
# /proc


def proc_status(pid):
    """{field: value} of /proc/PID/status; the kB fields in bytes."""
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[key] = int(parts[0]) * 1024
            elif parts:
                fields[key] = parts[0]
    return fields


def smaps_rollup(pid):
    fields = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                parts = line.split()
                if len(parts) == 3 and parts[2] == "kB":
                    fields[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        pass
    return fields


def smaps_kinds(pid):
    """Resident bytes by mapping kind: the binary, other files, [heap] (brk: the main arena),
    [stack], anonymous (other malloc arenas, thread stacks, big allocations made by mmap)."""
    kinds = {}
    exe = os.path.realpath(f"/proc/{pid}/exe")
    current = None
    with open(f"/proc/{pid}/smaps") as handle:
        for line in handle:
            first = line.split(None, 1)[0]
            if "-" in first and not first.endswith(":"):
                parts = line.split(None, 5)
                name = parts[5].strip() if len(parts) > 5 else ""
                if name == exe:
                    current = "binary"
                elif name in ("[heap]", "[stack]"):
                    current = name
                elif name.startswith("["):
                    current = "other"
                elif name:
                    current = "files"
                else:
                    current = "anonymous"
            elif first == "Rss:" and current:
                kinds[current] = kinds.get(current, 0) + int(line.split()[1]) * 1024
    return kinds


def memory_snapshot(pid):
    status = proc_status(pid)
    rollup = smaps_rollup(pid)
    return {"rss": status.get("VmRSS", 0), "hwm": status.get("VmHWM", 0),
            "threads": int(status.get("Threads", 0)),
            "pss": rollup.get("Pss", 0), "anonymous": rollup.get("Anonymous", 0),
            "private_dirty": rollup.get("Private_Dirty", 0), "kinds": smaps_kinds(pid)}


def describe_memory(name, snap, files=None):
    kinds = ", ".join(f"{kind} {fmt_bytes(size)}"
                      for kind, size in sorted(snap["kinds"].items(), key=lambda kv: -kv[1]))
    per_file = f", {snap['rss'] / files:.0f} B/file" if files else ""
    return (f"{name}: RSS {fmt_bytes(snap['rss'])} (peak {fmt_bytes(snap['hwm'])}), PSS "
            f"{fmt_bytes(snap['pss'])}, anonymous {fmt_bytes(snap['anonymous'])}, "
            f"{snap['threads']} threads{per_file}; resident by mapping: {kinds}")


def is_zombie_or_gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


class Processes(sb.Processes):
    """syncbench's process list (which knows agents behind a wrapper, `adopt`), stopped with a
    chosen signal: the agent by its own pid first (a wrapper passes no signal on), then the
    wrapper is waited for."""

    def stop(self, process, sig=signal.SIGTERM, wrapper_timeout=STOP_TIMEOUT_S):
        pid = self.wrapped.pop(process, None)
        if pid is not None:
            signal_and_wait(pid, sig)
            try:
                process.wait(timeout=wrapper_timeout)
            except subprocess.TimeoutExpired:
                log(f"wrapper pid {process.pid} still running after {wrapper_timeout} s")
        elif sig == signal.SIGKILL and process.poll() is None:
            process.kill()
        super().stop(process)

    def stop_all(self):
        for process in list(self.wrapped):
            self.stop(process)
        super().stop_all()


def signal_and_wait(pid, sig):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not is_zombie_or_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not is_zombie_or_gone(pid) and sig != signal.SIGKILL:
        log(f"pid {pid} ignored signal {sig} for {STOP_TIMEOUT_S} s; killing it")
        signal_and_wait(pid, signal.SIGKILL)


# --------------------------------------------------------------------------------------------
# vmsync


class Pair:
    """One vmsync-guest and one vmsync-host over a Unix socket (optionally through the relay)."""

    def __init__(self, ctx, work, host_root, guest_root, name="share", relay=False,
                 quiet=False):
        self.ctx, self.work = ctx, work
        self.host_root, self.guest_root = host_root, guest_root
        self.processes = ctx.processes
        self.quiet = quiet
        # Agents started from now on run under HOST_WRAPPER / GUEST_WRAPPER.
        self.wrap = ctx.wrapped and ctx.wrap_phase == "initial"
        os.makedirs(work, exist_ok=True)
        # Socket paths must fit in 107 bytes: a short directory of their own under /tmp.
        self.sockets = tempfile.mkdtemp(prefix="vmsc-", dir="/tmp")
        ctx.cleanups.append(lambda: shutil.rmtree(self.sockets, ignore_errors=True))
        self.guest_sock = os.path.join(self.sockets, "g.sock")
        self.relay_sock = os.path.join(self.sockets, "r.sock") if relay else None
        self.relay_stats = os.path.join(work, "relay-stats.json")
        self.host_ctl = os.path.join(self.sockets, "h.ctl")
        self.host_config = os.path.join(work, "host.toml")
        self.guest_config = os.path.join(work, "guest.toml")
        for directory in (host_root, guest_root, f"{work}/host-state", f"{work}/guest-state"):
            os.makedirs(directory, exist_ok=True)
        with open(self.guest_config, "w") as handle:
            handle.write(f'listen = "unix:{self.guest_sock}"\n'
                         f'state_dir = "{work}/guest-state"\n'
                         f'control = "{self.sockets}/g.ctl"\n'
                         f'[[share]]\nname = "{name}"\npath = "{guest_root}"\n')
        with open(self.host_config, "w") as handle:
            handle.write(f'guest = "unix:{self.relay_sock or self.guest_sock}"\n'
                         f'state_dir = "{work}/host-state"\n'
                         f'control = "{self.host_ctl}"\n'
                         f'[[share]]\nname = "{name}"\npath = "{host_root}"\n'
                         f'mode = "{ctx.mode}"\n')
        self.guest = self.host = self.relay = None
        self.pids = {}

    def _start_agent(self, which):
        binary = self.ctx.binary(f"vmsync-{which}")
        config = self.host_config if which == "host" else self.guest_config
        wrapper = shlex.split(os.environ.get(f"{which.upper()}_WRAPPER", "")) if self.wrap else []
        if not self.quiet:
            log(f"starting vmsync-{which}" + (f" under {' '.join(wrapper)}" if wrapper else ""))
        with open(os.path.join(self.work, f"{which}.log"), "ab") as log_file:
            process = subprocess.Popen(wrapper + [binary, "run", "--config", config],
                                       stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT,
                                       preexec_fn=sb._parent_death_signal)
        self.processes.running.append((f"vmsync-{which}", process))
        pid = sb.program_pid(process, binary)
        self.processes.adopt(process, pid)
        self.pids[which] = pid
        return process

    def start_guest(self):
        self.guest = self._start_agent("guest")
        sb.wait_for(lambda: os.path.exists(self.guest_sock), 60, "vmsync-guest listening",
                    self.guest, os.path.join(self.work, "guest.log"))
        if self.relay_sock and self.relay is None:
            self.relay = self.processes.start(
                "vmsync-relay", [self.ctx.binary("vmsync-relay"), self.relay_sock,
                                 self.guest_sock, "--stats-file", self.relay_stats],
                os.path.join(self.work, "relay.log"))
            sb.wait_for(lambda: os.path.exists(self.relay_sock) and
                        os.path.exists(self.relay_stats), 60, "vmsync-relay listening",
                        self.relay, os.path.join(self.work, "relay.log"))

    def start_host(self):
        self.host = self._start_agent("host")
        sb.wait_for(lambda: os.path.exists(self.host_ctl), 60, "vmsync-host control socket",
                    self.host, os.path.join(self.work, "host.log"))

    def cli(self, *args, timeout=None):
        return sb.run_timed([self.ctx.binary("vmsync-host"), *args, "--config",
                             self.host_config], timeout or self.ctx.timeout)

    def wait(self):
        waited = self.cli("wait", "--timeout", str(int(self.ctx.timeout)),
                          timeout=self.ctx.timeout + 60)
        self.check(waited, "wait")
        return waited

    def sync(self):
        synced = self.cli("sync")
        self.check(synced, "sync")
        return synced

    def check(self, timed, command):
        if timed.returncode != 0:
            status = self.cli("status", "--json", timeout=60)
            raise BenchError(f"vmsync-host {command} exited {timed.returncode}:\n{timed.output}"
                             f"\n--- status:\n{status.output}"
                             f"{sb.log_tail(os.path.join(self.work, 'host.log'))}"
                             f"{sb.log_tail(os.path.join(self.work, 'guest.log'))}")

    def cpu(self):
        return {which: sb.cpu_seconds(pid) for which, pid in self.pids.items()}

    def memory(self):
        return {which: memory_snapshot(pid) for which, pid in self.pids.items()}

    def reset_peaks(self):
        for pid in self.pids.values():
            sb.reset_peak_rss(pid)

    def wire_bytes(self):
        time.sleep(sb.RELAY_STATS_SETTLE_S)
        with open(self.relay_stats) as handle:
            stats = json.load(handle)
        return stats["up"] + stats["down"]

    def stop(self, sig=signal.SIGTERM, wrapper_timeout=STOP_TIMEOUT_S):
        for process in (self.host, self.guest):
            if process is not None:
                self.processes.stop(process, sig, wrapper_timeout)
        self.host = self.guest = None
        self.pids = {}

    def stop_relay(self):
        if self.relay is not None:
            self.processes.stop(self.relay)
            self.relay = None


# --------------------------------------------------------------------------------------------
# rsync


class SidedSampler(sb.PeakSampler):
    """syncbench's peak sampler, keeping the client's and the daemon side's peaks apart."""

    def __init__(self, daemon_pid):
        super().__init__(daemon_pid)
        self.client_pids = set()

    def _sample(self):
        if self.client_pid is not None:
            self.client_pids.update([self.client_pid] + sb.descendants(self.client_pid))
        super()._sample()

    def sides(self):
        client = sum(peak for pid, peak in self.peaks.items() if pid in self.client_pids)
        return client, self.total() - client


class Rsync(sb.RsyncDaemon):
    def run(self, phase, source):
        """Like syncbench's sync, with the client's and the daemon side's CPU and peaks apart."""
        self._wait_for_no_children()
        daemon_before = sb.cpu_seconds(self.daemon.pid)
        sampler = SidedSampler(self.daemon.pid)
        argv = (["rsync", "-a", "--delete"] + self.extra +
                [source.rstrip("/") + "/", f"rsync://127.0.0.1:{self.port}/bench/"])
        timed = sb.run_timed(argv, self.timeout, sampler, env=dict(os.environ, LC_ALL="C"))
        if timed.returncode != 0:
            raise BenchError(f"{self.tool} {phase} failed with status {timed.returncode}:\n"
                             f"{timed.output}{sb.log_tail(self.log_path)}")
        self._wait_for_no_children()
        daemon_cpu = sb.cpu_seconds(self.daemon.pid) - daemon_before
        client_peak, daemon_peak = sampler.sides()
        row = {"phase": phase, "tool": self.tool, "wall": timed.wall,
               "cpu": {"client": timed.cpu, "daemon": daemon_cpu},
               "peak": {"client": client_peak, "daemon": daemon_peak}}
        log(f"{self.tool} {phase}: {timed.wall:.2f} s, CPU client {timed.cpu:.2f} s + daemon "
            f"side {daemon_cpu:.2f} s, peak RSS client {fmt_bytes(client_peak)} + daemon side "
            f"{fmt_bytes(daemon_peak)} ({len(sampler.peaks)} processes)")
        return row


# --------------------------------------------------------------------------------------------
# Data


def make_small_files(root, count, seed):
    """`count` files of 64-2,048 random bytes, 100 a directory, directories two levels deep.
    Returns (files, bytes, directories)."""
    rng = random.Random(f"scale:{seed}:{count}")
    dirs = -(-count // FILES_PER_DIR)
    fanout = max(1, round(dirs ** 0.5 / 1.1))
    total = 0
    made = 0
    started = time.monotonic()
    for index in range(count):
        d = index // FILES_PER_DIR
        directory = os.path.join(root, f"t{d % fanout:03d}", f"d{d:05d}")
        if index % FILES_PER_DIR == 0:
            os.makedirs(directory)
            made += 1
        size = rng.randint(SMALL_MIN, SMALL_MAX)
        fd = os.open(os.path.join(directory, f"f{index:07d}.dat"),
                     os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, rng.randbytes(size))
        finally:
            os.close(fd)
        total += size
        if index and index % 100_000 == 0:
            log(f"  {index} files written ({time.monotonic() - started:.0f} s)")
    return count, total, made + fanout


def write_random(handle, count):
    """`count` incompressible bytes from the kernel's CSPRNG (ChaCha20): a stream that never
    repeats, so nothing in it deduplicates, and no holes."""
    while count > 0:
        block = os.urandom(min(BLOCK, count))
        handle.write(block)
        count -= len(block)


def copy_range(source, out, count):
    while count > 0:
        block = source.read(min(BLOCK, count))
        if not block:
            raise BenchError(f"{source.name} ended early")
        out.write(block)
        count -= len(block)


def sha1_file(path):
    return sb.file_digest(path)


_MANIFESTS = {}


def verify(label, source, dest, mtime_ns):
    """Compares dest with source (the source's manifest is made once: it does not change)."""
    if os.environ.get("VERIFY", "1") == "0":
        log(f"{label}: not verified (VERIFY=0)")
        return
    started = time.monotonic()
    if source not in _MANIFESTS:
        _MANIFESTS[source] = sb.manifest(source)
    sb.compare(_MANIFESTS[source], sb.manifest(dest), label, mtime_ns)
    log(f"{label}: verification took {time.monotonic() - started:.0f} s")


def count_tree(root):
    """Files, bytes and directories under root, vmsync's own `.vmsync/` left out."""
    files = total = dirs = 0
    for directory, subdirs, names in os.walk(root):
        if directory == root:
            subdirs[:] = [d for d in subdirs if not d.startswith(sb.IGNORED_TOP_LEVEL_PREFIX)]
        dirs += len(subdirs)
        for name in names:
            files += 1
            total += os.lstat(os.path.join(directory, name)).st_size
    return files, total, dirs


def need_space(parent, needed, what):
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise BenchError(f"{what} needs about {fmt_bytes(needed)} free in {parent}, which has "
                         f"{fmt_bytes(free)} (set BENCH_DIR or a smaller size)")
    log(f"{what}: about {fmt_bytes(needed)} needed, {fmt_bytes(free)} free in {parent}")


# --------------------------------------------------------------------------------------------
# Cases


class Context:
    def __init__(self, bin_dir, work, keep):
        self.bin_dir, self.work, self.keep = bin_dir, work, keep
        self.processes = Processes()
        self.cleanups = []
        self.mode = os.environ.get("MODE", "two-way")
        self.timeout = env_float("BENCH_TIMEOUT", 3600)
        self.rest = env_float("REST_SECS", 10)
        self.wrapped = bool(os.environ.get("HOST_WRAPPER") or os.environ.get("GUEST_WRAPPER"))
        self.wrap_phase = os.environ.get("WRAP_PHASE", "initial")
        if self.wrap_phase not in ("initial", "restart"):
            raise BenchError(f"WRAP_PHASE={self.wrap_phase}: expected initial or restart")
        self.vmsync_only = False

    def binary(self, name):
        path = os.path.join(self.bin_dir, name)
        if not os.access(path, os.X_OK):
            raise BenchError(f"{path} is missing: build with bench/scale-bench.sh (without "
                             "--no-build) or set CARGO_TARGET_DIR")
        return path

    def remove(self, path):
        if self.keep:
            return
        started = time.monotonic()
        shutil.rmtree(path, ignore_errors=True)
        log(f"removed {path} in {time.monotonic() - started:.0f} s")


def latency(pair, samples):
    """Host -> guest edit-to-visible latency of a 1 KiB file, in a directory of the share made
    for it (removed again afterwards)."""
    import latencybench  # the inotify helper and the one-sample routine
    subdir = "latency-samples"
    src_dir = os.path.join(pair.host_root, subdir)
    dst_dir = os.path.join(pair.guest_root, subdir)
    os.makedirs(src_dir)
    sb.wait_for(lambda: os.path.isdir(dst_dir), 120, f"{dst_dir} to appear")
    watcher = latencybench.Inotify()
    watcher.watch(dst_dir)
    rng = random.Random("latency")
    values = []
    try:
        for index in range(LATENCY_WARMUP + samples):
            seconds = latencybench.one_sample(src_dir, dst_dir, f"s{index:04d}.txt", watcher, rng)
            if index >= LATENCY_WARMUP:
                values.append(seconds)
            time.sleep(LATENCY_GAP_S)
    except RuntimeError as error:
        raise BenchError(str(error)) from error
    finally:
        watcher.close()
    shutil.rmtree(src_dir)
    pair.wait()
    sb.wait_for(lambda: not os.path.exists(dst_dir), 120, f"{dst_dir} to be removed")
    return values


def percentile(values, p):
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


def case_files(ctx, name, count):
    root = os.path.join(ctx.work, name)
    source, vdest = os.path.join(root, "host"), os.path.join(root, "guest")
    # SOURCE_DIR: the source tree outside the work directory, made there if missing and kept,
    # so that several runs share one (deleting 200,000 files takes minutes on some disks).
    reuse = os.environ.get("SOURCE_DIR")
    if reuse:
        source = os.path.abspath(reuse)
    # Per copy: a 4 KiB block and an inode per file, directories; source, vmsync's copy, two
    # rsync copies (all kept until the case ends: a big deletion would slow the file creation
    # of the next phase on ext4 without a journal); vmsync's state databases.
    copies = 2 if ctx.vmsync_only else 4
    if reuse and os.path.exists(source):
        copies -= 1
    need_space(ctx.work, count * (4096 + 600) * copies + count * 400 + GIB, name)
    started = time.monotonic()
    if reuse and os.path.exists(source):
        # What an earlier run's host agent kept in the share (its id, trash): a fresh start.
        shutil.rmtree(os.path.join(source, ".vmsync"), ignore_errors=True)
        files, total, dirs = count_tree(source)
        if files != count:
            raise BenchError(f"SOURCE_DIR {source} holds {files} files, not {count}")
        log(f"{name}: reusing {source}")
    else:
        log(f"{name}: writing {count} files")
        files, total, dirs = make_small_files(source, count, env_int("SEED", 1))
    log(f"{name}: {files} files, {fmt_bytes(total)}, {dirs} directories in "
        f"{time.monotonic() - started:.0f} s")
    result = {"case": name, "files": files, "bytes": total, "directories": dirs, "rows": []}
    rows = result["rows"]

    pair = Pair(ctx, os.path.join(root, "vmsync"), source, vdest)
    sb.settle_disk()
    started = time.monotonic()
    pair.start_guest()
    pair.start_host()
    waited = pair.wait()
    wall = time.monotonic() - started
    cpu = pair.cpu()
    mem = pair.memory()
    rows.append({"phase": "initial", "tool": "vmsync", "wall": wall, "cpu": cpu,
                 "cli_cpu": waited.cpu, "peak": {k: v["hwm"] for k, v in mem.items()}})
    log(f"vmsync initial: {wall:.2f} s, CPU host {cpu['host']:.2f} s, guest {cpu['guest']:.2f} s"
        f", peak RSS host {fmt_bytes(mem['host']['hwm'])}, guest "
        f"{fmt_bytes(mem['guest']['hwm'])}")
    log(f"resting {ctx.rest:g} s")
    time.sleep(ctx.rest)
    rest = pair.memory()
    rested = time.monotonic()
    result["rest_after_initial"] = rest
    for which in ("host", "guest"):
        log(describe_memory(f"at rest after the initial sync, {which}", rest[which], files))
    if pair.wrap:
        log("agents run under a wrapper: killing both at rest (SIGKILL) for the profile")
        pair.stop(signal.SIGKILL, env_float("WRAPPER_EXIT_TIMEOUT", 600))
        verify("vmsync initial", source, vdest, 1)
        ctx.remove(root)
        return result
    verify("vmsync initial", source, vdest, 1)
    long_rest = env_float("REST_LONG_SECS", 60)
    if long_rest > 0:
        # Past the 60 s for which each side remembers what its transitions wrote (echoes).
        log(f"resting {long_rest:g} s more")
        time.sleep(max(0.0, long_rest - (time.monotonic() - rested)))
        result["rest_long_after_initial"] = pair.memory()
        result["rest_long_secs"] = ctx.rest + long_rest
        for which in ("host", "guest"):
            log(describe_memory(f"{ctx.rest + long_rest:g} s after the initial sync, {which}",
                                result["rest_long_after_initial"][which], files))

    pair.reset_peaks()
    before = pair.cpu()
    synced = pair.sync()
    after = pair.cpu()
    mem = pair.memory()
    rows.append({"phase": "no-op", "tool": "vmsync", "wall": synced.wall,
                 "cpu": {k: after[k] - before[k] for k in after}, "cli_cpu": synced.cpu,
                 "peak": {k: v["hwm"] for k, v in mem.items()}})
    log(f"vmsync no-op: {synced.wall:.2f} s")

    samples = env_int("LATENCY_SAMPLES", 50)
    if samples > 0:
        values = latency(pair, samples)
        result["latency_ms"] = {"samples": len(values),
                                "p50": percentile(values, 50) * 1000,
                                "p90": percentile(values, 90) * 1000,
                                "max": max(values) * 1000}
        log(f"latency host -> guest: p50 {result['latency_ms']['p50']:.2f} ms, p90 "
            f"{result['latency_ms']['p90']:.2f} ms, max {result['latency_ms']['max']:.2f} ms")

    pair.stop()
    pair.wrap = ctx.wrapped and ctx.wrap_phase == "restart"
    started = time.monotonic()
    pair.start_guest()
    pair.start_host()
    waited = pair.wait()
    wall = time.monotonic() - started
    cpu = pair.cpu()
    mem = pair.memory()
    rows.append({"phase": "restart", "tool": "vmsync", "wall": wall, "cpu": cpu,
                 "cli_cpu": waited.cpu, "peak": {k: v["hwm"] for k, v in mem.items()}})
    log(f"vmsync restart: {wall:.2f} s to in sync")
    time.sleep(ctx.rest)
    rest = pair.memory()
    result["rest_after_restart"] = rest
    for which in ("host", "guest"):
        log(describe_memory(f"at rest after the restart, {which}", rest[which], files))
    if pair.wrap:
        log("agents run under a wrapper: killing both at rest (SIGKILL) for the profile")
        pair.stop(signal.SIGKILL, env_float("WRAPPER_EXIT_TIMEOUT", 600))
        ctx.remove(root)
        return result
    pair.stop()
    result["db_bytes"] = {which: dir_bytes(os.path.join(pair.work, f"{which}-state"))
                          for which in ("host", "guest")}

    if not ctx.vmsync_only:
        rsync_rows(ctx, root, source, rows)
    ctx.remove(root)
    return result


def rsync_rows(ctx, root, source, rows):
    daemon = Rsync(os.path.join(root, "rsync"), os.path.join(root, "rsync-dest"),
                   ctx.processes, ctx.timeout)
    os.makedirs(daemon.work)
    daemon.start()
    sb.settle_disk()
    rows.append(daemon.run("initial", source))
    verify("rsync initial", source, daemon.dest, 10**9)
    rows.append(daemon.run("no-op", source))
    ctx.processes.stop(daemon.daemon)
    if sb.rsync_has_fsync():
        durable = Rsync(os.path.join(root, "rsync-fsync"), os.path.join(root, "rsync-fsync-dest"),
                        ctx.processes, ctx.timeout, sb.RSYNC_FSYNC, ["--fsync"])
        os.makedirs(durable.work)
        durable.start()
        sb.settle_disk()
        rows.append(durable.run("initial", source))
        verify("rsync --fsync initial", source, durable.dest, 10**9)
        ctx.processes.stop(durable.daemon)
    else:
        log("this rsync has no --fsync (3.2.4 and later): no durable rsync run")


def dir_bytes(path):
    total = 0
    for directory, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                pass
    return total


def case_bigfile(ctx):
    gib = env_float("BIGFILE_GIB", 20)
    size = int(gib * GIB)
    root = os.path.join(ctx.work, "bigfile")
    source, dest = os.path.join(root, "host"), os.path.join(root, "guest")
    # The source, its edited copy until the rename, the guest's copy, its staged new version
    # (the old one then kept in the trash).
    need_space(ctx.work, 3 * size + GIB // 2, f"bigfile ({gib:g} GiB)")
    os.makedirs(source)
    path = os.path.join(source, "big.img")
    log(f"bigfile: writing {fmt_bytes(size)}")
    started = time.monotonic()
    with open(path, "wb") as handle:
        write_random(handle, size)
    log(f"bigfile: written in {time.monotonic() - started:.0f} s")
    result = {"case": "bigfile", "bytes": size, "rows": []}

    pair = Pair(ctx, os.path.join(root, "vmsync"), source, dest, relay=True)
    sb.settle_disk()
    pair.start_guest()
    wire_before = pair.wire_bytes()
    started = time.monotonic()
    pair.start_host()
    waited = pair.wait()
    wall = time.monotonic() - started
    cpu = pair.cpu()
    mem = pair.memory()
    wire = pair.wire_bytes() - wire_before
    result["rows"].append({"phase": "initial", "tool": "vmsync", "wall": wall, "cpu": cpu,
                           "cli_cpu": waited.cpu, "wire": wire,
                           "peak": {k: v["hwm"] for k, v in mem.items()}})
    log(f"bigfile initial: {wall:.2f} s, {fmt_bytes(wire)} on the wire, peak RSS host "
        f"{fmt_bytes(mem['host']['hwm'])}, guest {fmt_bytes(mem['guest']['hwm'])}")
    time.sleep(ctx.rest)
    result["rest_after_initial"] = pair.memory()
    for which in ("host", "guest"):
        log(describe_memory(f"bigfile at rest, {which}", result["rest_after_initial"][which]))
    digest = sha1_file(path)
    if sha1_file(os.path.join(dest, "big.img")) != digest:
        raise BenchError("bigfile: the guest's copy differs after the initial sync")

    # 1 MiB of new bytes inserted in the middle: a new version written outside the share (on
    # the same filesystem) and renamed over the file, so live sync sees only the finished one.
    pair.reset_peaks()
    wire_before = pair.wire_bytes()
    before = pair.cpu()
    temporary = os.path.join(root, "big.img.edit")
    log("bigfile: inserting 1 MiB in the middle (a copy renamed into place)")
    with open(path, "rb") as old, open(temporary, "wb") as new:
        copy_range(old, new, size // 2)
        write_random(new, INSERT_BYTES)
        copy_range(old, new, size - size // 2)
    started = time.monotonic()
    os.replace(temporary, path)
    synced = pair.sync()
    wall = time.monotonic() - started
    after = pair.cpu()
    mem = pair.memory()
    wire = pair.wire_bytes() - wire_before
    result["rows"].append({"phase": "delta", "tool": "vmsync", "wall": wall,
                           "cpu": {k: after[k] - before[k] for k in after},
                           "cli_cpu": synced.cpu, "wire": wire,
                           "peak": {k: v["hwm"] for k, v in mem.items()}})
    log(f"bigfile delta: {wall:.2f} s from the rename to `sync` returning, {fmt_bytes(wire)} on "
        f"the wire, peak RSS host {fmt_bytes(mem['host']['hwm'])}, guest "
        f"{fmt_bytes(mem['guest']['hwm'])}")
    if sha1_file(os.path.join(dest, "big.img")) != sha1_file(path):
        raise BenchError("bigfile: the guest's copy differs after the delta")
    log("bigfile: verified (SHA-1) after the initial sync and after the delta")
    pair.stop()
    pair.stop_relay()
    ctx.remove(root)
    return result


def case_fleet(ctx):
    count = env_int("FLEET", 20)
    files = env_int("FLEET_FILES", 200)
    idle = env_float("FLEET_IDLE_SECS", 30)
    root = os.path.join(ctx.work, "fleet")
    need_space(ctx.work, count * files * 4096 * 2 * 2 + GIB, f"fleet ({count} pairs)")
    pairs = []
    for index in range(count):
        base = os.path.join(root, f"vm{index:02d}")
        make_small_files(os.path.join(base, "host"), files, index)
        pairs.append(Pair(ctx, os.path.join(base, "vmsync"), os.path.join(base, "host"),
                          os.path.join(base, "guest"), quiet=True))
    log(f"fleet: starting {count} guests and {count} hosts ({files} files each)")
    started = time.monotonic()
    for pair in pairs:
        pair.start_guest()
    for pair in pairs:
        pair.start_host()
    for pair in pairs:
        pair.wait()
    log(f"fleet: all {count} shares in sync {time.monotonic() - started:.1f} s after the start")
    time.sleep(ctx.rest)
    before = [pair.cpu() for pair in pairs]
    load_before = os.getloadavg()[0]
    time.sleep(idle)
    after = [pair.cpu() for pair in pairs]
    mems = [pair.memory() for pair in pairs]
    result = {"case": "fleet", "pairs": count, "files_each": files, "idle_s": idle,
              "load": [load_before, os.getloadavg()[0]], "agents": []}
    for index, (b, a, m) in enumerate(zip(before, after, mems)):
        for which in ("host", "guest"):
            result["agents"].append({"pair": index, "agent": which, "cpu": a[which] - b[which],
                                     "rss": m[which]["rss"], "pss": m[which]["pss"],
                                     "hwm": m[which]["hwm"], "threads": m[which]["threads"]})
    for pair in pairs:
        pair.stop()
    ctx.remove(root)
    return result


def case_standard(ctx):
    """bench/sync-bench.sh at full scale, its table as printed, and each agent's peak RSS."""
    out = os.path.join(ctx.work, "standard.json")
    env = dict(os.environ, BENCH_DIR=ctx.work, SCALE=os.environ.get("STANDARD_SCALE", "1"),
               CARGO_TARGET_DIR=os.path.dirname(ctx.bin_dir))
    argv = ["bash", os.path.join(HERE, "sync-bench.sh"), "--no-build", "--json", out]
    if ctx.vmsync_only:
        argv.append("--vmsync-only")
    log(f"standard: {' '.join(argv)} (SCALE={env['SCALE']})")
    with tempfile.TemporaryFile() as table:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=table, env=env,
                                   preexec_fn=sb._parent_death_signal)
        try:
            code = process.wait(timeout=ctx.timeout * 4)
        except BaseException:
            # syncbench cleans up on SIGTERM: give it time to remove its data.
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=STOP_TIMEOUT_S)
            raise
        table.seek(0)
        printed = table.read().decode(errors="replace")
    if code != 0:
        raise BenchError(f"sync-bench.sh exited {code}:\n{printed}")
    with open(out) as handle:
        data = json.load(handle)
    return {"case": "standard", "scale": data["scale"], "table": printed,
            "results": data["results"],
            "files": data["files"], "bytes": data["bytes"], "versions": data["versions"]}


# --------------------------------------------------------------------------------------------
# Report


def mib(count):
    return f"{count / MIB:.1f}"


def table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:])]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def sides(row):
    """(first side, second side) for vmsync (host, guest) and rsync (client, daemon side)."""
    if row["tool"] == "vmsync":
        return ("host", "guest")
    return ("client", "daemon")


def report_files(result):
    files = result["files"]
    print(f"\n{result['case']}: {files} files, {fmt_bytes(result['bytes'])}, "
          f"{result['directories']} directories")
    rows = [("phase", "tool", "wall s", "CPU s", "CPU split s", "peak RSS MiB",
             "at rest MiB", "B/file at rest")]
    rests = {"initial": result.get("rest_after_initial"),
             "restart": result.get("rest_after_restart")}
    for row in result["rows"]:
        a, b = sides(row)
        cpu = row["cpu"][a] + row["cpu"][b] + row.get("cli_cpu", 0)
        rest = rests.get(row["phase"]) if row["tool"] == "vmsync" else None
        rows.append((row["phase"], row["tool"], f"{row['wall']:.2f}", f"{cpu:.2f}",
                     f"{row['cpu'][a]:.2f} / {row['cpu'][b]:.2f}",
                     f"{mib(row['peak'][a])} / {mib(row['peak'][b])}",
                     f"{mib(rest['host']['rss'])} / {mib(rest['guest']['rss'])}" if rest else "",
                     f"{rest['host']['rss'] / files:.0f} / {rest['guest']['rss'] / files:.0f}"
                     if rest else ""))
    by = {(r["phase"], r["tool"]): r for r in result["rows"]}

    def total_cpu(row):
        a, b = sides(row)
        return row["cpu"][a] + row["cpu"][b] + row.get("cli_cpu", 0)

    def total_peak(row):
        a, b = sides(row)
        return row["peak"][a] + row["peak"][b]

    for phase, peer in (("initial", "rsync"), ("initial", sb.RSYNC_FSYNC), ("no-op", "rsync")):
        mine, theirs = by.get((phase, "vmsync")), by.get((phase, peer))
        if mine and theirs:
            rows.append((phase, f"vmsync/{peer}", sb.ratio(mine["wall"], theirs["wall"]),
                         sb.ratio(total_cpu(mine), total_cpu(theirs)), "",
                         sb.ratio(total_peak(mine), total_peak(theirs)), "", ""))
    print(table(rows))
    print("  CPU split and peak RSS: vmsync host / guest; rsync client (sender) / daemon side "
          "(receiver processes). At rest: RSS after REST_SECS idle (VmRSS).")
    if "latency_ms" in result:
        lat = result["latency_ms"]
        print(f"  live edit -> visible, host -> guest, 1 KiB, {lat['samples']} samples in the "
              f"populated share: p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, max "
              f"{lat['max']:.2f} ms")
    for key, label in (("rest_after_initial", "at rest after the initial sync"),
                       ("rest_long_after_initial",
                        f"{result.get('rest_long_secs', 0):g} s after the initial sync"),
                       ("rest_after_restart", "at rest after the restart")):
        if key in result:
            for which in ("host", "guest"):
                print("  " + describe_memory(f"{label}, {which}", result[key][which], files))
    if "db_bytes" in result:
        print(f"  state databases on disk: host {fmt_bytes(result['db_bytes']['host'])}, guest "
              f"{fmt_bytes(result['db_bytes']['guest'])}")


def report_bigfile(result):
    print(f"\nbigfile: one file of {fmt_bytes(result['bytes'])} (incompressible), then "
          f"{fmt_bytes(INSERT_BYTES)} inserted in its middle; vmsync through vmsync-relay")
    rows = [("phase", "tool", "wall s", "CPU s", "CPU host / guest s", "peak RSS host / guest MiB",
             "on the wire")]
    for row in result["rows"]:
        cpu = row["cpu"]["host"] + row["cpu"]["guest"] + row["cli_cpu"]
        rows.append((row["phase"], row["tool"], f"{row['wall']:.2f}", f"{cpu:.2f}",
                     f"{row['cpu']['host']:.2f} / {row['cpu']['guest']:.2f}",
                     f"{mib(row['peak']['host'])} / {mib(row['peak']['guest'])}",
                     fmt_bytes(row["wire"])))
    print(table(rows))
    print("  delta wall: from the rename of the new version into place until `vmsync-host sync` "
          "returns (live sync starts on the rename)")
    rest = result["rest_after_initial"]
    for which in ("host", "guest"):
        print("  " + describe_memory(f"at rest after the initial sync, {which}", rest[which]))


def report_fleet(result):
    print(f"\nfleet: {result['pairs']} pairs (vmsync-host + vmsync-guest), "
          f"{result['files_each']} files each, idle and in sync; load average "
          f"{result['load'][0]:.2f} -> {result['load'][1]:.2f}")
    rows = [("agent", "", "RSS min / median / max MiB", "RSS total MiB", "PSS total MiB",
             "threads each", f"CPU s over {result['idle_s']:g} s (all)", "CPU s max one")]
    for which in ("host", "guest"):
        agents = [a for a in result["agents"] if a["agent"] == which]
        rss = [a["rss"] for a in agents]
        rows.append((f"vmsync-{which}", f"x{len(agents)}",
                     f"{mib(min(rss))} / {mib(statistics.median(rss))} / {mib(max(rss))}",
                     mib(sum(rss)), mib(sum(a["pss"] for a in agents)),
                     "/".join(sorted({str(a["threads"]) for a in agents})),
                     f"{sum(a['cpu'] for a in agents):.2f}",
                     f"{max(a['cpu'] for a in agents):.2f}"))
    print(table(rows))
    print("  RSS counts the shared binary pages in every process; PSS divides them among the "
          "processes sharing them. CPU: utime + stime from /proc/PID/stat, 10 ms ticks.")


def report_standard(result):
    print(f"\nstandard: bench/sync-bench.sh, SCALE={result['scale']:g}")
    print("\n".join(line for line in result["table"].rstrip().splitlines()
                    if not line.startswith("results written to")))
    print("  vmsync peak RSS per agent (VmHWM, reset before each phase):")
    for row in result["results"]:
        by = row.get("peak_rss_bytes_by_process")
        if by:
            parts = ", ".join(f"{name} {fmt_bytes(value)}" for name, value in by.items())
            print(f"    {row['phase']}: {parts}; together {fmt_bytes(row['peak_rss_bytes'])}")


# --------------------------------------------------------------------------------------------
# Heap profiles


PROJECT_DIRS = ("engine/", "core/", "protocol/", "transport/", "agent-common/", "agent-host/",
                "agent-guest/")
SIZE_UNITS = {"": 1, "B": 1, "K": 1000, "M": 1000**2, "G": 1000**3}


def parse_size(text):
    """heaptrack_print's sizes: 520.37K, 2.69M (powers of 1000)."""
    unit = text[-1] if text[-1] in "BKMG" else ""
    return float(text[:-1] if unit else text) * SIZE_UNITS[unit]


def heap_sites(path, kind):
    """[(bytes, calls, frames)] of every backtrace in a heaptrack file: what was still allocated
    at the end (kind "leaked": for an agent killed at rest, what it held at rest) or at the peak
    (kind "peak"). frames: [(function, "file:line")], innermost first."""
    flags = ["-p", "0", "-l", "1"] if kind == "leaked" else ["-p", "1", "-l", "0"]
    out = subprocess.run(["heaptrack_print", "-f", path, "-a", "0", "-T", "0", "-m", "0",
                          "-n", "1000000"] + flags,
                         capture_output=True, text=True, check=True).stdout
    marker = " leaked over " if kind == "leaked" else " peak memory consumed over "
    sites, frames, current = [], None, None
    for line in out.splitlines():
        if marker in line and line.rstrip().endswith(("from", "from:")):
            size, rest = line.split(marker)
            current = [parse_size(size.strip()), int(rest.split()[0]), []]
            sites.append(current)
            frames = current[2]
        elif current is not None and line.startswith("    at "):
            if frames and frames[-1][1] is None:
                frames[-1] = (frames[-1][0], line.strip()[3:])
        elif current is not None and line.startswith("  ") and not line.startswith("    "):
            frames.append((line.strip(), None))
    return sites


def out_lines(path):
    out = subprocess.run(["heaptrack_print", "-f", path, "-a", "0", "-T", "0", "-p", "0",
                          "-l", "0"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()


def short_location(location):
    if not location:
        return "?"
    if "/registry/src/" in location:
        return location.split("/registry/src/", 1)[1].split("/", 1)[1]
    for marker in ("/library/", "/src/"):
        if location.startswith("/") and marker in location:
            head, tail = location.split(marker, 1)
            crate = os.path.basename(head) if marker == "/src/" else "std"
            return f"{crate}:{tail}"
    return location


def heap_report(path, kind, top, files=0):
    """The allocation sites holding the most, grouped by the innermost frame in this project's
    code (function, file:line), with the library frame that allocated and the project caller."""
    groups = {}
    total = 0
    for size, calls, frames in heap_sites(path, kind):
        total += size
        own = [i for i, (_, loc) in enumerate(frames) if loc and loc.startswith(PROJECT_DIRS)]
        if own:
            first = own[0]
            key = f"{frames[first][0]} {frames[first][1]}"
            caller = next((f"{frames[i][0]} {frames[i][1]}" for i in own[1:]
                           if frames[i][1] != frames[first][1]), "")
            inner = [f for f in frames[:first] if f[0] not in
                     ("alloc", "alloc_impl", "alloc_impl_runtime", "allocate", "malloc")]
            via = f"{inner[-1][0]} {short_location(inner[-1][1])}" if inner else ""
        else:
            named = [f for f in frames if f[1] and not f[1].startswith("/rustc/")]
            key = (f"{named[0][0]} {short_location(named[0][1])}" if named
                   else (frames[0][0] if frames else "?"))
            caller, via = "", ""
        group = groups.setdefault(key, [0, 0, {}, {}])
        group[0] += size
        group[1] += calls
        group[2][caller] = group[2].get(caller, 0) + size
        group[3][via] = group[3].get(via, 0) + size
    summary = [line for line in out_lines(path) if line.startswith(("peak heap", "total memory"))]
    print(f"{path}: {kind}, {fmt_bytes(total)} in all ({'; '.join(summary)})")
    for key, (size, calls, callers, vias) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:top]:
        per_file = f" {size / files:>6.0f} B/file" if files else ""
        print(f"  {fmt_bytes(size):>10}{per_file} {calls:>9} calls  {key}")
        for label, table_ in (("via", vias), ("from", callers)):
            for name, part in sorted(table_.items(), key=lambda kv: -kv[1])[:2]:
                if name:
                    print(f"  {'':>10} {'':>15}   {label} {name} ({fmt_bytes(part)})")


# --------------------------------------------------------------------------------------------
# Main


def run(argv):
    keep = "--keep" in argv
    json_out = sb.option_value(argv, "--json")
    bin_dir = sb.option_value(argv, "--bin-dir") or os.path.join(
        os.path.dirname(HERE), "target", "release")
    skip = {"--keep", "--vmsync-only"}
    values = {json_out, bin_dir}
    cases = [a for a in argv if a not in skip and a not in values and a not in
             ("--json", "--bin-dir")]
    extra_files = os.environ.get("FILES")
    for case in cases:
        if case not in ALL_CASES and not (case.startswith("files") and case[5:].isdigit()):
            raise BenchError(f"unknown case {case!r}; cases: {', '.join(ALL_CASES)} "
                             "(or filesN for N files)")
    if not cases:
        cases = list(DEFAULT_CASES)
        if extra_files:
            cases[0] = f"files{int(extra_files)}"
    parent = os.environ.get("BENCH_DIR") or tempfile.gettempdir()
    work = tempfile.mkdtemp(prefix="vmsync-scale-", dir=parent)
    ctx = Context(bin_dir, work, keep)
    ctx.vmsync_only = "--vmsync-only" in argv or ctx.wrapped
    results = []
    load = os.getloadavg()
    log(f"work directory {work}; cases {', '.join(cases)}; load average {load[0]:.2f}")
    try:
        for case in cases:
            log(f"=== {case}")
            if case == "million":
                result = case_files(ctx, case, 1_000_000)
            elif case == "files200k":
                result = case_files(ctx, case, 200_000)
            elif case.startswith("files"):
                result = case_files(ctx, case, int(case[5:]))
            elif case == "bigfile":
                result = case_bigfile(ctx)
            elif case == "fleet":
                result = case_fleet(ctx)
            else:
                result = case_standard(ctx)
            results.append(result)
        ctx.processes.stop_all()
        versions = sb.tool_versions(bin_dir, True, not ctx.vmsync_only)
        print(f"\nvmsync at scale, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
              f"load average {load[0]:.2f} at start, {os.getloadavg()[0]:.2f} at end; "
              f"MODE={ctx.mode}, MALLOC_ARENA_MAX="
              f"{os.environ.get('MALLOC_ARENA_MAX', 'unset (the agents use 2)')}")
        for name, value in versions.items():
            print(f"  {name}: {value}")
        for result in results:
            if result["case"] == "bigfile":
                report_bigfile(result)
            elif result["case"] == "fleet":
                report_fleet(result)
            elif result["case"] == "standard":
                report_standard(result)
            else:
                report_files(result)
        if json_out:
            with open(json_out, "w") as handle:
                json.dump({"versions": versions, "machine": platform.node(),
                           "results": results}, handle, indent=2)
            print(f"\nresults written to {json_out}")
    finally:
        ctx.processes.stop_all()
        for cleanup in ctx.cleanups:
            cleanup()
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv):
    signal.signal(signal.SIGTERM, sb.on_signal)
    signal.signal(signal.SIGHUP, sb.on_signal)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] == "heap":
        # scalebench.py heap FILE.zst [leaked|peak] [TOP] [FILES]
        heap_report(argv[1], argv[2] if len(argv) > 2 else "leaked",
                    int(argv[3]) if len(argv) > 3 else 25, int(argv[4]) if len(argv) > 4 else 0)
        return 0
    try:
        run(argv)
    except BenchError as error:
        print(f"scale-bench: FAILED: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        print(f"scale-bench: interrupted ({interrupt}); cleaned up", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
