#!/usr/bin/env python3
"""vmsync vs. rsync benchmark. Python 3 standard library only.

Normally started by bench/sync-bench.sh, which installs rsync, builds the release binaries and
passes --bin-dir. Subcommands:

  run   [--rsync-only | --vmsync-only] [--keep] [--json FILE] [--bin-dir DIR]
        Generate the data set, then time, for each tool: the initial sync into an empty
        destination, a no-op re-sync, and the delta after a scripted edit. Prints a table.
  gen   DIR      Generate the data set into DIR (for looking at it).
  edit  DIR      Apply the scripted edit to a tree made by `gen`.

Environment:
  SCALE=F           size factor, default 1 (20,000 files / 500 MiB + 4 x 256 MiB);
                    0.05 gives a run of a few seconds, for CI.
  SEED=N            data and edit seed, default 1.
  BENCH_DIR=DIR     parent of the temporary work directory (default $TMPDIR or /tmp).
  BENCH_TIMEOUT=S   bound on any single phase, default 3600.
  RSYNC_FLAGS="..." extra flags for the rsync client (default none: plain `rsync -a --delete`).
  HOST_WRAPPER / GUEST_WRAPPER="cmd ..." put a command in front of an agent (e.g.
                    "heaptrack -o FILE"); CPU and peak RSS are read from the agent itself,
                    which is stopped first and its wrapper given WRAPPER_EXIT_TIMEOUT (600) s.

What is measured, per phase and tool:
  wall   vmsync: initial = from starting vmsync-host until `vmsync-host wait` returns;
         no-op and delta = the `vmsync-host sync` command. rsync: the client command.
  CPU    user+system seconds of every process doing the work. vmsync: both daemons (deltas of
         /proc/PID/stat, children included) and the CLI command. rsync: the client (wait4) and
         the daemon's forked children (the daemon's cutime/cstime delta once it reaped them).
         The byte-counting relay on vmsync's path is not counted (it is measurement only).
  RSS    sum of each process's peak resident set during the phase. vmsync: VmHWM of both
         daemons, reset before each phase through /proc/PID/clear_refs. rsync: VmHWM of the
         client and of each daemon child, sampled every 10 ms while the client runs.
  wire   vmsync: bytes both ways through vmsync-relay (frames, headers, everything). rsync: the
         client's "Total bytes sent" + "Total bytes received" (--stats).
After every phase the destination is compared with the source (type, permission bits, size,
SHA-1 of content, symlink target; file mtimes to the nanosecond for vmsync, to the second for
rsync) and the run fails loudly on any difference. Top-level names starting with ".vmsync" are
left out of the comparison in case vmsync keeps a marker or staging area in the share root.
"""

import array
import ctypes
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

MIB = 1024 * 1024

# Full-scale data set: about 20,000 files / 500 MiB, plus four 256 MiB files.
FULL_FILE_COUNT = 20_000
FULL_SMALL_TOTAL_BYTES = 500 * MIB
FULL_BIG_FILE_BYTES = 256 * MIB
# Log-normal shape of the small files' sizes; sizes are then scaled to the exact total.
SIZE_SIGMA = 2.0
MAX_SMALL_FILE_BYTES = 32 * MIB
RANDOM_FILE_FRACTION = 0.1
# Scripted edit (full scale): 1 % of files changed in place, 50 deleted, a directory of 100
# files renamed, 1 MiB inserted in the middle of a big file.
EDIT_CHANGED_FRACTION = 0.01
FULL_DELETED_COUNT = 50
FULL_RENAMED_DIR_FILES = 100
INSERT_BYTES = 1 * MIB

RENAME_FROM = "vendor/widgets-1.0"
RENAME_TO = "vendor/widgets-1.1"
BIG_FILES = ("big/text.log", "big/random.bin", "big/mixed-1.img", "big/mixed-2.img")
INSERT_TARGET = "big/mixed-1.img"

WRITE_BLOCK_BYTES = 4 * MIB
HASH_BLOCK_BYTES = 1 * MIB
PROCESS_STOP_TIMEOUT_S = 10
STARTUP_TIMEOUT_S = 30
RSYNC_CHILD_SAMPLE_S = 0.01
# The relay rewrites its stats file every 200 ms; waiting longer than two periods guarantees
# the file reflects every byte of a phase that has finished.
RELAY_STATS_SETTLE_S = 0.5
IGNORED_TOP_LEVEL_PREFIX = ".vmsync"

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PYTHON_EXECUTABLE = os.path.realpath(sys.executable)


class BenchError(Exception):
    """A failure the run reports and stops on (after cleaning up)."""


def log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Data set


class Params:
    """Every size and count of the data set and the edit, derived from SCALE."""

    def __init__(self, scale, seed):
        if not scale > 0:
            raise BenchError(f"SCALE must be a positive number, got {scale}")
        self.scale = scale
        self.seed = seed
        self.file_count = max(50, round(FULL_FILE_COUNT * scale))
        self.small_total = max(1 * MIB, round(FULL_SMALL_TOTAL_BYTES * scale))
        self.big_file_bytes = max(4 * MIB, round(FULL_BIG_FILE_BYTES * scale))
        self.changed_count = max(1, round(self.file_count * EDIT_CHANGED_FRACTION))
        self.deleted_count = max(2, round(FULL_DELETED_COUNT * scale))
        self.renamed_dir_files = max(10, round(FULL_RENAMED_DIR_FILES * scale))
        self.insert_bytes = min(INSERT_BYTES, self.big_file_bytes // 4)

    def describe(self):
        return (
            f"{self.file_count} files / {fmt_bytes(self.small_total)} + 4 x "
            f"{fmt_bytes(self.big_file_bytes)} ({', '.join(BIG_FILES)}); edit: "
            f"{self.changed_count} changed in place, {self.deleted_count} deleted, "
            f"{RENAME_FROM} ({self.renamed_dir_files} files) renamed, "
            f"{fmt_bytes(self.insert_bytes)} inserted in {INSERT_TARGET}"
        )


class TextSource:
    """Deterministic source-code-like text: Zipf-weighted pseudo-words in phrases, with line
    breaks and indentation. It compresses about 2.7x, like real source, and every file's text is
    its own (drawn from the file's own generator), so no content repeats between files by
    construction: a tool cannot look better through accidental deduplication."""

    def __init__(self, seed):
        rng = random.Random(f"vocab:{seed}")
        letters = "etaoinshrdlcumwfgypbvkjxqz"
        weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 5.9, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2,
                   1.9, 1.5, 1, 0.8, 0.2, 0.2, 0.1, 0.1]
        lengths = [1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 7, 8, 9, 10]
        vocab = ["".join(rng.choices(letters, weights, k=rng.choice(lengths)))
                 for _ in range(3000)]
        vocab += ["fn", "let", "mut", "return", "if", "else", "{", "}", "(", ")", ";", "=",
                  "==", "->", "self", "struct", "impl", "pub", "use", "//", "#", "0", "1", "i",
                  "x", "for", "in", "while", "match"]
        rng.shuffle(vocab)
        zipf = [1.0 / (rank + 1) for rank in range(len(vocab))]
        # 65,536 phrases of 1-5 words, indexed by 16-bit random numbers below: joining phrases
        # instead of single words makes generation several times faster.
        phrases = []
        for _ in range(65536):
            phrase = " ".join(rng.choices(vocab, zipf, k=rng.choice([1, 2, 3, 4, 5])))
            roll = rng.random()
            if roll < 0.2:
                phrase += "\n" + " " * rng.choice([0, 4, 4, 8, 8, 12])
            elif roll < 0.25:
                phrase += ","
            elif roll < 0.3:
                phrase += "."
            phrases.append(phrase.encode())
        self.phrases = phrases

    def generate(self, rng, size):
        parts = []
        have = 0
        while have < size:
            count = (size - have) // 17 + 16
            indices = array.array("H")
            indices.frombytes(rng.randbytes(2 * count))
            part = b" ".join(map(self.phrases.__getitem__, indices))
            parts.append(part)
            have += len(part) + 1
        return b" ".join(parts)[:size]


def random_bytes(rng, size):
    # randbytes builds one integer of 8*size bits; pieces keep it within CPython's limits.
    return b"".join(rng.randbytes(min(WRITE_BLOCK_BYTES, size - offset))
                    for offset in range(0, size, WRITE_BLOCK_BYTES))


def write_file(path, data, mode=0o644):
    with open(path, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)


def generate(root, params):
    """Writes the data set under `root` (created, must not exist) and returns (files, bytes)."""
    os.makedirs(root)
    text = TextSource(params.seed)
    rng = random.Random(f"layout:{params.seed}")

    # A random tree: each new directory hangs under a random existing one, up to depth 6.
    words = ["src", "lib", "docs", "tests", "assets", "core", "util", "net", "ui", "data",
             "build", "tools", "include", "scripts", "res", "img", "cfg", "api", "db", "io"]
    dirs = [""]
    dir_count = max(5, params.file_count // 20)
    while len(dirs) < dir_count + 1:
        parent = rng.choice(dirs)
        if parent.count("/") >= 5:
            continue
        name = f"{rng.choice(words)}{len(dirs)}"
        dirs.append(f"{parent}/{name}" if parent else name)
    small_dirs = dirs

    # Sizes: log-normal, scaled to the exact total.
    raw = [min(rng.lognormvariate(0, SIZE_SIGMA), 1e9) for _ in range(params.file_count)]
    factor = params.small_total / sum(raw)
    sizes = [min(MAX_SMALL_FILE_BYTES, int(value * factor)) for value in raw]
    sizes[0] += params.small_total - sum(sizes)  # exact total; the slack lands on one file

    text_exts = [".rs", ".c", ".h", ".py", ".md", ".txt", ".json", ".toml"]
    binary_exts = [".bin", ".png", ".o", ".gz"]
    files = []
    for index, size in enumerate(sizes):
        is_random = rng.random() < RANDOM_FILE_FRACTION
        # The first files fill the directory that the edit renames.
        if index < params.renamed_dir_files:
            directory = RENAME_FROM
        else:
            directory = rng.choice(small_dirs)
        ext = rng.choice(binary_exts if is_random else text_exts)
        executable = not is_random and rng.random() < 0.02
        if executable:
            ext = ".sh"
        rel = f"{directory}/f{index:05d}{ext}" if directory else f"f{index:05d}{ext}"
        files.append((rel, size, is_random, 0o755 if executable else 0o644))

    made = set()
    total = 0
    for rel, size, is_random, mode in files:
        parent = os.path.dirname(rel)
        if parent and parent not in made:
            os.makedirs(os.path.join(root, parent), exist_ok=True)
            made.add(parent)
        # One generator per file, seeded by its name: contents do not depend on order.
        file_rng = random.Random(f"file:{params.seed}:{rel}")
        data = random_bytes(file_rng, size) if is_random else text.generate(file_rng, size)
        write_file(os.path.join(root, rel), data, mode)
        total += size
    # A few empty directories: they must sync too.
    for index in range(3):
        os.makedirs(os.path.join(root, f"empty{index}", "nested"), exist_ok=True)

    os.makedirs(os.path.join(root, "big"), exist_ok=True)
    for rel in BIG_FILES:
        big_rng = random.Random(f"big:{params.seed}:{rel}")
        with open(os.path.join(root, rel), "wb") as handle:
            left = params.big_file_bytes
            while left > 0:
                if rel.endswith("text.log"):
                    kind_random, block = False, min(WRITE_BLOCK_BYTES, left)
                elif rel.endswith("random.bin"):
                    kind_random, block = True, min(WRITE_BLOCK_BYTES, left)
                else:
                    # Mixed: runs of 64 KiB - 4 MiB, text or random, like a disk image.
                    kind_random = big_rng.random() < 0.5
                    block = min(left, big_rng.randint(64 * 1024, 4 * MIB))
                if kind_random:
                    handle.write(random_bytes(big_rng, block))
                else:
                    handle.write(text.generate(big_rng, block))
                left -= block
        total += params.big_file_bytes
    return len(files) + len(BIG_FILES), total


def edit(root, params):
    """The scripted edit. Deterministic for a given tree and seed; returns a summary."""
    rng = random.Random(f"edit:{params.seed}")
    candidates = []
    for directory, _dirs, names in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        if rel_dir == "big" or rel_dir == RENAME_FROM or rel_dir.startswith(RENAME_FROM + "/"):
            continue
        for name in names:
            candidates.append(os.path.normpath(os.path.join(rel_dir, name)))
    candidates.sort()
    needed = params.deleted_count + params.changed_count
    if len(candidates) < needed:
        raise BenchError(f"only {len(candidates)} files to edit, need {needed}")
    picked = rng.sample(candidates, needed)
    deleted, changed = picked[:params.deleted_count], picked[params.deleted_count:]
    for rel in deleted:
        os.unlink(os.path.join(root, rel))
    changed_bytes = 0
    for rel in changed:
        path = os.path.join(root, rel)
        size = os.path.getsize(path)
        patch = rng.randbytes(min(256, max(size, 64)))
        with open(path, "r+b") as handle:
            handle.seek(rng.randrange(max(1, size - len(patch) + 1)))
            handle.write(patch)
        changed_bytes += len(patch)
    os.rename(os.path.join(root, RENAME_FROM), os.path.join(root, RENAME_TO))

    # Insert in the middle: a new file with head + insert + tail, renamed over the old one.
    target = os.path.join(root, INSERT_TARGET)
    size = os.path.getsize(target)
    temporary = target + ".edit"
    with open(target, "rb") as source, open(temporary, "wb") as out:
        copy_bytes(source, out, size // 2)
        out.write(random_bytes(rng, params.insert_bytes))
        copy_bytes(source, out, size - size // 2)
    os.replace(temporary, target)
    return (f"{len(changed)} files changed in place ({fmt_bytes(changed_bytes)}), "
            f"{len(deleted)} deleted, {RENAME_FROM} -> {RENAME_TO}, "
            f"{fmt_bytes(params.insert_bytes)} inserted in {INSERT_TARGET}")


def copy_bytes(source, out, count):
    while count > 0:
        block = source.read(min(WRITE_BLOCK_BYTES, count))
        if not block:
            raise BenchError(f"{source.name} ended early")
        out.write(block)
        count -= len(block)


# --------------------------------------------------------------------------------------------
# Tree comparison


def manifest(root):
    """{relative path: description} of everything under root except the ignored top level."""
    entries = {}
    for directory, dirs, names in os.walk(root):
        rel_dir = os.path.relpath(directory, root)
        if rel_dir == ".":
            dirs[:] = [d for d in dirs if not d.startswith(IGNORED_TOP_LEVEL_PREFIX)]
            names = [n for n in names if not n.startswith(IGNORED_TOP_LEVEL_PREFIX)]
        for name in dirs + names:
            path = os.path.join(directory, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            perm = st.st_mode & 0o7777
            if os.path.islink(path):
                entries[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                entries[rel] = ("dir", perm)
            elif os.path.isfile(path):
                entries[rel] = ("file", perm, st.st_size, file_digest(path), st.st_mtime_ns)
            else:
                entries[rel] = ("other", st.st_mode)
    return entries


def file_digest(path):
    # SHA-1 only to compare trees: fast in OpenSSL, and nobody here is adversarial.
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK_BYTES):
            digest.update(block)
    return digest.hexdigest()


def compare(expected, actual, label, mtime_resolution_ns):
    """Raises BenchError listing the differences between two manifests."""

    def normal(entry):
        if entry[0] == "file":
            kind, perm, size, digest, mtime = entry
            return (kind, perm, size, digest, mtime // mtime_resolution_ns)
        return entry

    problems = []
    for rel in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(rel), actual.get(rel)
        if want is None:
            problems.append(f"  extra in destination: {rel} {got}")
        elif got is None:
            problems.append(f"  missing in destination: {rel} {want}")
        elif normal(want) != normal(got):
            problems.append(f"  differs: {rel}\n    source      {want}\n    destination {got}")
    if problems:
        shown = "\n".join(problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise BenchError(f"{label}: destination differs from source in {len(problems)} "
                         f"entries:\n{shown}{more}")
    log(f"{label}: verified, {len(actual)} entries identical")


# --------------------------------------------------------------------------------------------
# Processes


try:
    _PRCTL = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _PRCTL = None
PR_SET_PDEATHSIG = 1


def _parent_death_signal():
    # Runs in the child between fork and exec: if the benchmark dies without cleaning up (for
    # example SIGKILL), the kernel sends SIGTERM to its children. Linux-only, best effort. The
    # libc handle is looked up beforehand: the child of a threaded parent should do little.
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


class Processes:
    """Every long-running process the benchmark starts, stopped by PID in reverse order."""

    def __init__(self):
        self.running = []  # (name, Popen)
        self.wrapped = {}  # wrapper Popen -> pid of the program it runs

    def start(self, name, argv, log_path):
        log(f"starting {name}: {' '.join(argv)}")
        with open(log_path, "ab") as log_file:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file,
                                       stderr=subprocess.STDOUT,
                                       preexec_fn=_parent_death_signal)
        self.running.append((name, process))
        return process

    def adopt(self, process, pid):
        """`process` is a wrapper (e.g. heaptrack, a shell script) running the program as `pid`:
        stopping it signals `pid` (a wrapper passes no signal on), then waits for the wrapper."""
        if pid != process.pid:
            self.wrapped[process] = pid

    def stop(self, process):
        for index, (name, candidate) in enumerate(self.running):
            if candidate is process:
                del self.running[index]
                self._stop(name, process)
                return

    def stop_all(self):
        while self.running:
            name, process = self.running.pop()
            self._stop(name, process)

    def _stop(self, name, process):
        pid = self.wrapped.pop(process, None)
        if pid is not None and process.poll() is None:
            try:
                os.kill(pid, signal.SIGTERM)
                process.wait(timeout=float(os.environ.get("WRAPPER_EXIT_TIMEOUT", "600")))
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        stop_process(name, process)


def stop_process(name, process):
    """SIGTERM, a bounded wait, then SIGKILL and another bounded wait."""
    if process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=PROCESS_STOP_TIMEOUT_S)
        return
    except subprocess.TimeoutExpired:
        log(f"{name} (pid {process.pid}) ignored SIGTERM for {PROCESS_STOP_TIMEOUT_S} s; "
            "killing it")
    except ProcessLookupError:
        return
    try:
        process.kill()
        process.wait(timeout=PROCESS_STOP_TIMEOUT_S)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        log(f"{name} (pid {process.pid}) did not exit after SIGKILL")


def cpu_seconds(pid):
    """User + system time of a live process and of its children that it has reaped."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime 14, stime 15, cutime 16, cstime 17.
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def peak_rss_bytes(pid):
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss(pid):
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0+).
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError as error:
        log(f"cannot reset the peak RSS of pid {pid} ({error}); peaks span the whole run")


def child_pids(pid):
    """Direct children of pid, from /proc (every thread's children file)."""
    children = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                children.extend(int(child) for child in handle.read().split())
    except OSError:
        pass
    return children


def descendants(pid):
    found, stack = [], child_pids(pid)
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(child_pids(child))
    return found


def program_pid(process, binary, timeout=STARTUP_TIMEOUT_S):
    """The pid running `binary`: the process itself, or (behind a wrapper such as heaptrack,
    a shell script) the descendant that runs it."""
    binary = os.path.realpath(binary)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in [process.pid] + descendants(process.pid):
            try:
                if os.path.realpath(f"/proc/{pid}/exe") == binary:
                    return pid
            except OSError:
                continue
        if process.poll() is not None:
            break
        time.sleep(0.02)
    raise BenchError(f"no process runs {binary} under pid {process.pid}")


class Timed:
    """The outcome of one command run to completion."""

    def __init__(self, returncode, wall, cpu, output):
        self.returncode = returncode
        self.wall = wall
        self.cpu = cpu
        self.output = output


def run_timed(argv, timeout, sampler=None, env=None):
    """Runs argv to completion and returns its wall time and CPU time (wait4), with stdout and
    stderr captured. A watchdog kills it after `timeout` seconds. Peak RSS comes from a
    `PeakSampler`, not from wait4 (see there)."""
    with tempfile.TemporaryFile() as output:
        start = time.monotonic()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output,
                                   stderr=subprocess.STDOUT, preexec_fn=_parent_death_signal,
                                   env=env)
        timed_out = threading.Event()

        def watchdog():
            timed_out.set()
            try:
                os.kill(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, watchdog)
        timer.start()
        if sampler:
            sampler.watch(process.pid)
            sampler.start()
        try:
            _, status, usage = os.wait4(process.pid, 0)
        except BaseException:
            # Interrupted (SIGTERM, Ctrl-C): this child is not in `Processes`; stop it here.
            stop_process(argv[0], process)
            raise
        finally:
            timer.cancel()
            if sampler:
                sampler.stop()
        wall = time.monotonic() - start
        # os.wait4 reaped it behind Popen's back; tell Popen so it does not wait again.
        process.returncode = os.waitstatus_to_exitcode(status)
        output.seek(0)
        text = output.read().decode(errors="replace")
    if timed_out.is_set():
        raise BenchError(f"{' '.join(argv)} did not finish within {timeout} s; output:\n{text}")
    return Timed(process.returncode, wall, usage.ru_utime + usage.ru_stime, text)


class PeakSampler:
    """Samples the peak RSS (VmHWM) of a client and of a daemon's descendants while the client
    runs: they exit before anyone could ask the kernel afterwards.

    The client's own ru_maxrss from wait4 is not used: the kernel carries the pre-exec peak
    over exec, and before exec the child was a copy of this Python process, so ru_maxrss would
    report the benchmark's own memory. VmHWM belongs to the exec'd program's address space."""

    def __init__(self, daemon_pid):
        self.daemon_pid = daemon_pid
        self.client_pid = None
        self.peaks = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._sample()
        self._stop.set()
        self._thread.join(timeout=PROCESS_STOP_TIMEOUT_S)

    def watch(self, client_pid):
        self.client_pid = client_pid

    def _sample(self):
        pids = descendants(self.daemon_pid)
        if self.client_pid is not None:
            # The client itself only after its exec: before, it is a copy of this process.
            try:
                exe = os.path.realpath(f"/proc/{self.client_pid}/exe")
            except OSError:
                exe = None
            if exe and exe != PYTHON_EXECUTABLE:
                pids += [self.client_pid] + descendants(self.client_pid)
        for pid in pids:
            try:
                peak = peak_rss_bytes(pid)
            except OSError:
                continue  # exited between listing and reading
            self.peaks[pid] = max(self.peaks.get(pid, 0), peak)

    def _run(self):
        while not self._stop.wait(RSYNC_CHILD_SAMPLE_S):
            self._sample()

    def total(self):
        return sum(self.peaks.values())


def wait_for(predicate, timeout, what, process=None, log_path=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if process is not None and process.poll() is not None:
            raise BenchError(f"{what}: the process exited with status {process.returncode}"
                             f"{log_tail(log_path)}")
        time.sleep(0.02)
    raise BenchError(f"{what}: not ready after {timeout} s{log_tail(log_path)}")


def log_tail(path, lines=30):
    if not path or not os.path.exists(path):
        return ""
    with open(path, errors="replace") as handle:
        tail = handle.readlines()[-lines:]
    return f"\n--- last lines of {path}:\n" + "".join(tail)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# The two tools


class Result:
    def __init__(self, phase, tool, wall, cpu, rss, wire, rss_by_process=None):
        self.phase, self.tool = phase, tool
        self.wall, self.cpu, self.rss, self.wire = wall, cpu, rss, wire
        # vmsync: {"vmsync-host": peak, "vmsync-guest": peak}, the two addends of `rss`.
        self.rss_by_process = rss_by_process

    def as_dict(self):
        result = {"phase": self.phase, "tool": self.tool, "wall_s": round(self.wall, 3),
                  "cpu_s": round(self.cpu, 3), "peak_rss_bytes": self.rss,
                  "wire_bytes": self.wire}
        if self.rss_by_process:
            result["peak_rss_bytes_by_process"] = self.rss_by_process
        return result


class RsyncDaemon:
    """rsync pushing to an rsync daemon on 127.0.0.1: the usual way to rsync between machines
    without ssh, so rsync's delta-transfer algorithm is in play as it is over a network."""

    def __init__(self, work, dest, processes, timeout, tool="rsync", flags=()):
        self.work, self.dest = work, dest
        self.processes, self.timeout = processes, timeout
        self.tool = tool
        self.daemon = None
        self.port = None
        self.log_path = os.path.join(work, "rsyncd.log")
        self.extra = os.environ.get("RSYNC_FLAGS", "").split() + list(flags)

    def start(self):
        os.makedirs(self.dest, exist_ok=True)
        # A free port can be taken between the probe and the daemon's bind: retry a few times.
        for _attempt in range(3):
            self.port = free_port()
            config = os.path.join(self.work, "rsyncd.conf")
            with open(config, "w") as handle:
                handle.write(
                    f"# written by bench/syncbench.py\n"
                    f"use chroot = no\n"
                    # Without chroot, rsync munges symlinks by default; the trees must match.
                    f"munge symlinks = no\n"
                    f"numeric ids = yes\n"
                    f"address = 127.0.0.1\n"
                    f"port = {self.port}\n"
                    f"log file = {self.log_path}\n"
                    f"[bench]\n"
                    f"    path = {self.dest}\n"
                    f"    read only = no\n"
                    f"    uid = {os.getuid()}\n"
                    f"    gid = {os.getgid()}\n")
            self.daemon = self.processes.start(
                "rsync daemon",
                ["rsync", "--daemon", "--no-detach", f"--config={config}",
                 f"--port={self.port}", "--address=127.0.0.1"],
                os.path.join(self.work, "rsyncd.out"))
            try:
                wait_for(lambda: port_open(self.port), STARTUP_TIMEOUT_S, "rsync daemon",
                         self.daemon, self.log_path)
                # Someone else answering on the port while our daemon died of EADDRINUSE.
                if self.daemon.poll() is None:
                    return
                raise BenchError(f"exited with status {self.daemon.returncode}")
            except BenchError as error:
                log(f"rsync daemon on port {self.port} did not come up ({error}); retrying")
                self.processes.stop(self.daemon)
        raise BenchError("the rsync daemon did not start; see " + self.log_path)

    def sync(self, phase, source):
        """One `rsync -a --delete` run from source to the daemon's module."""
        # Children from an earlier phase must be gone, or their CPU would be reaped into this
        # phase's figures.
        self._wait_for_no_children()
        daemon_cpu_before = cpu_seconds(self.daemon.pid)
        sampler = PeakSampler(self.daemon.pid)
        argv = (["rsync", "-a", "--delete", "--stats"] + self.extra +
                [source.rstrip("/") + "/", f"rsync://127.0.0.1:{self.port}/bench/"])
        # The C locale fixes the thousands separator that parse_rsync_total strips.
        timed = run_timed(argv, self.timeout, sampler, env=dict(os.environ, LC_ALL="C"))
        if timed.returncode != 0:
            raise BenchError(f"rsync {phase} failed with status {timed.returncode}:\n"
                             f"{timed.output}{log_tail(self.log_path)}")
        # The daemon's children add to its cutime/cstime once it has reaped them.
        self._wait_for_no_children()
        daemon_cpu = cpu_seconds(self.daemon.pid) - daemon_cpu_before
        wire = parse_rsync_total(timed.output, "Total bytes sent") + \
            parse_rsync_total(timed.output, "Total bytes received")
        log(f"{self.tool} {phase}: client {timed.cpu:.2f} s CPU, daemon side {daemon_cpu:.2f} s "
            f"CPU; {len(sampler.peaks)} processes, {fmt_bytes(sampler.total())} summed peaks")
        return Result(phase, self.tool, timed.wall, timed.cpu + daemon_cpu, sampler.total(),
                      wire)

    def _wait_for_no_children(self):
        wait_for(lambda: not child_pids(self.daemon.pid), PROCESS_STOP_TIMEOUT_S,
                 "rsync daemon children to exit", self.daemon, self.log_path)


RSYNC_FSYNC = "rsync --fsync"


def rsync_has_fsync():
    out = subprocess.run(["rsync", "--help"], capture_output=True, text=True)
    return "--fsync" in out.stdout


def parse_rsync_total(output, label):
    for line in output.splitlines():
        if line.startswith(label + ":"):
            number = line.split(":", 1)[1].split()[0]
            return int(number.replace(",", "").replace(".", ""))
    raise BenchError(f"no '{label}' in rsync --stats output:\n{output}")


class Vmsync:
    """vmsync-host → vmsync-relay → vmsync-guest over Unix sockets, driven through the CLI."""

    def __init__(self, bin_dir, work, source, dest, processes, timeout):
        self.bin_dir, self.work = bin_dir, work
        self.source, self.dest = source, dest
        self.processes, self.timeout = processes, timeout
        # Socket paths must fit in 107 bytes: they live in a short directory of their own.
        self.sockets = tempfile.mkdtemp(prefix="vmsb-", dir="/tmp")
        self.guest_sock = os.path.join(self.sockets, "guest.sock")
        self.relay_sock = os.path.join(self.sockets, "relay.sock")
        self.guest_ctl = os.path.join(self.sockets, "guest.ctl")
        self.host_ctl = os.path.join(self.sockets, "host.ctl")
        self.relay_stats = os.path.join(work, "relay-stats.json")
        self.host_config = os.path.join(work, "host.toml")
        self.guest_config = os.path.join(work, "guest.toml")
        self.guest = self.host = self.relay = None
        self.guest_pid = self.host_pid = None

    def start_agent(self, which, config):
        """vmsync-`which` under $HOST_WRAPPER / $GUEST_WRAPPER if set (e.g. "heaptrack -o F"):
        the Popen, and the pid of the agent itself (what CPU and peak RSS are read from)."""
        name = f"vmsync-{which}"
        wrapper = shlex.split(os.environ.get(f"{which.upper()}_WRAPPER", ""))
        process = self.processes.start(name, wrapper + [self.binary(name), "run", "--config",
                                                        config], self.log_path(which))
        pid = program_pid(process, self.binary(name)) if wrapper else process.pid
        self.processes.adopt(process, pid)
        return process, pid

    def binary(self, name):
        path = os.path.join(self.bin_dir, name)
        if not os.access(path, os.X_OK):
            raise BenchError(f"{path} is missing; build with `cargo build --release -p "
                             "vmsync-host -p vmsync-guest -p vmsync-tests` or pass --bin-dir")
        return path

    def log_path(self, name):
        return os.path.join(self.work, f"{name}.log")

    def write_configs(self):
        for directory in (self.dest, f"{self.work}/guest-state", f"{self.work}/host-state"):
            os.makedirs(directory, exist_ok=True)
        with open(self.guest_config, "w") as handle:
            handle.write(f'listen = "unix:{self.guest_sock}"\n'
                         f'state_dir = "{self.work}/guest-state"\n'
                         f'control = "{self.guest_ctl}"\n'
                         f'[[share]]\nname = "bench"\npath = "{self.dest}"\n')
        with open(self.host_config, "w") as handle:
            handle.write(f'guest = "unix:{self.relay_sock}"\n'
                         f'state_dir = "{self.work}/host-state"\n'
                         f'control = "{self.host_ctl}"\n'
                         f'[[share]]\nname = "bench"\npath = "{self.source}"\n'
                         f'mode = "host-to-guest"\n')

    def start_guest_side(self):
        self.write_configs()
        for name, config in (("vmsync-host", self.host_config),
                             ("vmsync-guest", self.guest_config)):
            check = run_timed([self.binary(name), "check", "--config", config], 60)
            if check.returncode != 0:
                raise BenchError(f"{name} check rejected {config}:\n{check.output}")
        self.guest, self.guest_pid = self.start_agent("guest", self.guest_config)
        wait_for(lambda: os.path.exists(self.guest_sock), STARTUP_TIMEOUT_S,
                 "vmsync-guest listening", self.guest, self.log_path("guest"))
        self.relay = self.processes.start(
            "vmsync-relay",
            [self.binary("vmsync-relay"), self.relay_sock, self.guest_sock,
             "--stats-file", self.relay_stats],
            self.log_path("relay"))
        wait_for(lambda: os.path.exists(self.relay_sock) and os.path.exists(self.relay_stats),
                 STARTUP_TIMEOUT_S, "vmsync-relay listening", self.relay,
                 self.log_path("relay"))

    def wire_bytes(self):
        time.sleep(RELAY_STATS_SETTLE_S)
        with open(self.relay_stats) as handle:
            stats = json.load(handle)
        return stats["up"] + stats["down"]

    def host_cli(self, *args, timeout=None):
        return run_timed([self.binary("vmsync-host"), *args, "--config", self.host_config],
                         timeout or self.timeout)

    def initial(self):
        wire_before = self.wire_bytes()
        relay_cpu_before = cpu_seconds(self.relay.pid)
        guest_cpu_before = cpu_seconds(self.guest_pid)
        reset_peak_rss(self.guest_pid)
        start = time.monotonic()
        self.host, self.host_pid = self.start_agent("host", self.host_config)
        # `wait` talks to the control socket, which exists once the host is up.
        wait_for(lambda: os.path.exists(self.host_ctl), STARTUP_TIMEOUT_S,
                 "vmsync-host control socket", self.host, self.log_path("host"))
        waited = self.host_cli("wait", "--timeout", str(int(self.timeout)),
                               timeout=self.timeout + 60)
        wall = time.monotonic() - start
        self._check("wait", waited)
        cpu = cpu_seconds(self.host_pid) + (cpu_seconds(self.guest_pid) - guest_cpu_before)
        peaks = self._peaks("initial")
        self._log_relay_cpu("initial", relay_cpu_before)
        return Result("initial", "vmsync", wall, cpu + waited.cpu, sum(peaks.values()),
                      self.wire_bytes() - wire_before, peaks)

    def _peaks(self, phase):
        """Each daemon's peak RSS (VmHWM) since its last reset."""
        peaks = {"vmsync-host": peak_rss_bytes(self.host_pid),
                 "vmsync-guest": peak_rss_bytes(self.guest_pid)}
        log(f"vmsync {phase}: peak RSS " +
            ", ".join(f"{name} {fmt_bytes(peak)}" for name, peak in peaks.items()))
        return peaks

    def begin_sync(self):
        """Baselines taken before a no-op or delta phase (before the edit, for the delta, so a
        daemon that notices the edit by itself is still charged for it)."""
        for pid in (self.host_pid, self.guest_pid):
            reset_peak_rss(pid)
        return (self.wire_bytes(), cpu_seconds(self.host_pid), cpu_seconds(self.guest_pid),
                cpu_seconds(self.relay.pid))

    def sync(self, phase, baseline):
        wire_before, host_before, guest_before, relay_before = baseline
        synced = self.host_cli("sync")
        self._check("sync", synced)
        cpu = (cpu_seconds(self.host_pid) - host_before) + \
            (cpu_seconds(self.guest_pid) - guest_before) + synced.cpu
        peaks = self._peaks(phase)
        self._log_relay_cpu(phase, relay_before)
        return Result(phase, "vmsync", synced.wall, cpu, sum(peaks.values()),
                      self.wire_bytes() - wire_before, peaks)

    def _log_relay_cpu(self, phase, before):
        log(f"vmsync {phase}: the relay used {cpu_seconds(self.relay.pid) - before:.2f} s CPU "
            "(measurement only, not counted)")

    def _check(self, command, timed):
        if timed.returncode == 0:
            return
        status = self.host_cli("status", "--json", timeout=60)
        raise BenchError(
            f"vmsync-host {command} exited with status {timed.returncode}:\n{timed.output}\n"
            f"--- vmsync-host status --json:\n{status.output}"
            f"{log_tail(self.log_path('host'))}{log_tail(self.log_path('guest'))}")

    def status_json(self):
        status = self.host_cli("status", "--json", timeout=60)
        try:
            return json.loads(status.output)
        except ValueError:
            return status.output

    def status_summary(self):
        """What vmsync itself says about its shares, for a failure message."""
        status = self.status_json()
        if not isinstance(status, dict):
            return f"vmsync-host status --json:\n{status}"
        lines = []
        for share in status.get("shares", []):
            problems = share.get("problems") or []
            lines.append(f"vmsync share {share.get('name')!r}: state {share.get('state')!r}, "
                         f"halt {share.get('halt_reason')!r}, "
                         f"{len(share.get('conflicts') or [])} conflicts, "
                         f"{len(problems)} problems")
            for problem in problems[:5]:
                lines.append(f"  problem: {problem}")
        return "\n".join(lines)

    def cleanup(self):
        shutil.rmtree(self.sockets, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Report


def settle_disk():
    """Writes back every dirty page (untimed), so the next phase does not pay for earlier ones."""
    started = time.monotonic()
    os.sync()
    log(f"sync before the next phase: {time.monotonic() - started:.2f} s")


def durable_write_floor(directory, count):
    """Seconds to write `count` bytes into one new file in `directory` and fdatasync it: what
    durability alone costs on this disk, whatever the tool. Incompressible bytes, 1 MiB writes;
    the file is removed afterwards."""
    path = os.path.join(directory, "durable-write-floor")
    block = random.Random(7).randbytes(1 << 20)
    started = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        left = count
        while left > 0:
            left -= os.write(fd, block[:min(left, len(block))])
        os.fdatasync(fd)
    finally:
        os.close(fd)
    took = time.monotonic() - started
    os.unlink(path)
    return took


def fmt_bytes(count):
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def ratio(mine, theirs):
    if theirs == 0:
        return "n/a" if mine == 0 else "inf"
    return f"{mine / theirs:.2f}x"


def print_report(results, params, dataset, versions, floor=None):
    rows = [("phase", "tool", "wall s", "CPU s", "peak RSS", "on the wire")]
    by_key = {(r.phase, r.tool): r for r in results}
    for phase in ("initial", "no-op", "delta"):
        for tool in ("vmsync", "rsync", RSYNC_FSYNC):
            r = by_key.get((phase, tool))
            if r:
                rows.append((phase, tool, f"{r.wall:.2f}", f"{r.cpu:.2f}", fmt_bytes(r.rss),
                             fmt_bytes(r.wire)))
        for peer in ("rsync", RSYNC_FSYNC):
            mine, theirs = by_key.get((phase, "vmsync")), by_key.get((phase, peer))
            if mine and theirs:
                rows.append((phase, f"vmsync/{peer}", ratio(mine.wall, theirs.wall),
                             ratio(mine.cpu, theirs.cpu), ratio(mine.rss, theirs.rss),
                             ratio(mine.wire, theirs.wire)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    print(f"vmsync benchmark: SCALE={params.scale:g} SEED={params.seed}; "
          f"{dataset[0]} files, {fmt_bytes(dataset[1])}")
    print(f"  {params.describe()}")
    for name, value in versions.items():
        print(f"  {name}: {value}")
    print()
    for index, row in enumerate(rows):
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:], widths[2:])]
        print("  ".join(cells))
        if index == 0:
            print("  ".join("-" * width for width in widths))
    print()
    checks = []
    initial = (by_key.get(("initial", "vmsync")), by_key.get(("initial", "rsync")))
    noop = (by_key.get(("no-op", "vmsync")), by_key.get(("no-op", "rsync")))
    delta = (by_key.get(("delta", "vmsync")), by_key.get(("delta", "rsync")))
    initial_fsync = by_key.get(("initial", RSYNC_FSYNC))
    # The initial-sync target is against rsync given vmsync's durable writes: rsync --fsync. Plain
    # rsync leaves its writes in the page cache and is shown for reference.
    if initial[0] and initial_fsync:
        checks.append((f"initial sync faster than rsync with vmsync's durable writes "
                       f"({RSYNC_FSYNC})", initial[0].wall < initial_fsync.wall))
    if all(delta):
        checks.append(("delta bytes at most half of rsync's",
                       delta[0].wire <= delta[1].wire / 2))
    if all(noop):
        checks.append(("no-op re-sync no slower than rsync", noop[0].wall <= noop[1].wall))
    for text, ok in checks:
        print(f"target: {text}: {'met' if ok else 'NOT MET'}")
    if all(initial):
        print(f"reference: initial sync vs rsync without fsync: "
              f"{ratio(initial[0].wall, initial[1].wall)} wall")
    if floor is not None:
        print(f"reference: writing {fmt_bytes(dataset[1])} into one file on this disk and "
              f"fdatasync-ing it took {floor:.2f} s: no tool can sync the data set durably "
              f"in less")
    print(f"notes: vmsync fsyncs every file it writes, rsync (default flags) does not, "
          f"{RSYNC_FSYNC} does (initial sync only); all read a source tree that is in the page "
          f"cache.")


def tool_versions(bin_dir, want_vmsync, want_rsync):
    versions = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
                           f"Linux {platform.release()}, Python {platform.python_version()}"}
    if want_rsync:
        out = subprocess.run(["rsync", "--version"], capture_output=True, text=True)
        versions["rsync"] = (out.stdout.splitlines() or ["?"])[0]
    if want_vmsync:
        out = subprocess.run([os.path.join(bin_dir, "vmsync-host"), "--version"],
                             capture_output=True, text=True)
        versions["vmsync"] = out.stdout.strip() or out.stderr.strip() or "?"
        repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "-C", repo, "describe", "--always", "--dirty"],
                             capture_output=True, text=True)
        if rev.returncode == 0:
            versions["vmsync"] += f" ({rev.stdout.strip()})"
    return versions


# --------------------------------------------------------------------------------------------
# Main


def params_from_env():
    try:
        scale = float(os.environ.get("SCALE", "1"))
        seed = int(os.environ.get("SEED", "1"))
    except ValueError as error:
        raise BenchError(f"bad SCALE or SEED: {error}") from error
    return Params(scale, seed)


def check_free_space(parent, params):
    dataset = params.small_total + 4 * params.big_file_bytes
    # Source, three destinations, vmsync's staging and state, and slack.
    needed = int(dataset * 4.5) + 256 * MIB
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise BenchError(f"{parent} has {fmt_bytes(free)} free; this SCALE needs about "
                         f"{fmt_bytes(needed)} (set BENCH_DIR or a smaller SCALE)")


def run(args):
    want_vmsync = "--rsync-only" not in args
    want_rsync = "--vmsync-only" not in args
    if not (want_vmsync or want_rsync):
        raise BenchError("--rsync-only and --vmsync-only exclude each other")
    keep = "--keep" in args
    json_out = option_value(args, "--json")
    bin_dir = option_value(args, "--bin-dir") or os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "target", "release")
    params = params_from_env()
    timeout = float(os.environ.get("BENCH_TIMEOUT", "3600"))
    parent = os.environ.get("BENCH_DIR") or tempfile.gettempdir()
    check_free_space(parent, params)

    work = tempfile.mkdtemp(prefix="vmsync-bench-", dir=parent)
    processes = Processes()
    vmsync = None
    results = []
    try:
        source = os.path.join(work, "source")
        log(f"work directory {work}; generating {params.describe()}")
        started = time.monotonic()
        dataset = generate(source, params)
        log(f"generated {dataset[0]} files, {fmt_bytes(dataset[1])} in "
            f"{time.monotonic() - started:.1f} s; hashing the source")
        expected = manifest(source)

        rsync = rsync_fsync = None
        if want_rsync:
            rsync_work = os.path.join(work, "rsync")
            os.makedirs(rsync_work)
            rsync = RsyncDaemon(rsync_work, os.path.join(work, "rsync-dest"), processes, timeout)
            rsync.start()
            # The same durability as vmsync: rsync fsyncs each file it writes (3.2.4 and later).
            if rsync_has_fsync():
                fsync_work = os.path.join(work, "rsync-fsync")
                os.makedirs(fsync_work)
                rsync_fsync = RsyncDaemon(fsync_work, os.path.join(work, "rsync-fsync-dest"),
                                          processes, timeout, RSYNC_FSYNC, ["--fsync"])
                rsync_fsync.start()
            else:
                log("this rsync has no --fsync (3.2.4 and later): no durable rsync run")
        if want_vmsync:
            vmsync_work = os.path.join(work, "vmsync")
            os.makedirs(vmsync_work)
            vmsync = Vmsync(bin_dir, vmsync_work, source, os.path.join(work, "vmsync-dest"),
                            processes, timeout)
            vmsync.start_guest_side()

        def record(result, dest, mtime_resolution_ns):
            log(f"{result.phase} {result.tool}: {result.wall:.2f} s wall, {result.cpu:.2f} s "
                f"CPU, {fmt_bytes(result.wire)} on the wire")
            try:
                compare(expected, manifest(dest), f"{result.tool} {result.phase}",
                        mtime_resolution_ns)
            except BenchError as error:
                if result.tool == "vmsync":
                    raise BenchError(f"{error}\n{vmsync.status_summary()}") from error
                raise
            results.append(result)

        # vmsync must keep mtimes to the nanosecond. rsync is checked to the second:
        # it keeps nanoseconds only from protocol 31 on, and the run should not fail on an
        # older rsync for something it never promised.
        # Each initial sync (and the floor) starts with nothing left to write back: otherwise a
        # phase would pay for the data set's generation or the previous tool's dirty pages.
        if vmsync:
            settle_disk()
            record(vmsync.initial(), vmsync.dest, 1)
        if rsync:
            settle_disk()
            record(rsync.sync("initial", source), rsync.dest, 10**9)
        if rsync_fsync:
            settle_disk()
            record(rsync_fsync.sync("initial", source), rsync_fsync.dest, 10**9)
        floor = None
        if vmsync and rsync_fsync:
            settle_disk()
            floor = durable_write_floor(work, dataset[1])
            log(f"durable-write floor: {fmt_bytes(dataset[1])} written and fdatasync-ed "
                f"in {floor:.2f} s")
        if vmsync:
            record(vmsync.sync("no-op", vmsync.begin_sync()), vmsync.dest, 1)
        if rsync:
            record(rsync.sync("no-op", source), rsync.dest, 10**9)

        baseline = vmsync.begin_sync() if vmsync else None
        log("edit: " + edit(source, params))
        expected = manifest(source)
        if vmsync:
            record(vmsync.sync("delta", baseline), vmsync.dest, 1)
        if rsync:
            record(rsync.sync("delta", source), rsync.dest, 10**9)

        status = vmsync.status_json() if vmsync else None
        processes.stop_all()
        versions = tool_versions(bin_dir, want_vmsync, want_rsync)
        print_report(results, params, dataset, versions, floor)
        if json_out:
            with open(json_out, "w") as handle:
                json.dump({"scale": params.scale, "seed": params.seed,
                           "files": dataset[0], "bytes": dataset[1],
                           "versions": versions, "durable_write_floor_s": floor,
                           "results": [r.as_dict() for r in results],
                           "vmsync_status": status}, handle, indent=2)
            print(f"results written to {json_out}")
    finally:
        processes.stop_all()
        if vmsync:
            vmsync.cleanup()
        if keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def option_value(args, name):
    if name in args:
        index = args.index(name)
        if index + 1 >= len(args):
            raise BenchError(f"{name} needs a value")
        return args[index + 1]
    return None


def on_signal(signum, _frame):
    # Turn SIGTERM / SIGHUP into an exception so the `finally` blocks stop every process.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv):
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, args = argv[0], argv[1:]
    try:
        if command == "run":
            run(args)
        elif command in ("gen", "edit") and len(args) == 1:
            params = params_from_env()
            if command == "gen":
                files, total = generate(args[0], params)
                print(f"generated {files} files, {fmt_bytes(total)} in {args[0]}")
            else:
                print(edit(args[0], params))
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except BenchError as error:
        print(f"bench: FAILED: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interrupt:
        print(f"bench: interrupted ({interrupt}); cleaned up", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
