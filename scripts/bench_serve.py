"""Benchmark `pacs serve` against DCMTK's storescp, both fed by DCMTK's storescu.

Usage: python scripts/bench_serve.py [--count N] [--repeat R] [--durability fsync|none]
                                     [--keep] [--tmp DIR]

Writes N synthetic CT slices (512x512, 16-bit, Explicit VR Little Endian; default 1,000) with
scripts/benchdata.make_ct_series into a temporary folder, then, R times (default 3; the
order rotates between runs), sends them all on one association with
`TCP_NODELAY=1 /usr/bin/storescu +sd DIR +sp '*.dcm'` to

  (a) `python -m pacscli serve --archive TMP --port P --bind 127.0.0.1 --format jsonl`, with
      its default settings (durable writes: fsync of file and folder, then the index commit,
      before each success status), a fresh archive each run;
  (b) `/usr/bin/storescp +B -od DIR P` (bit-preserving), a fresh folder each run.

and (c) `python scripts/floor_receiver.py`: the least a durable receiver in Python does (direct
I/O writes, a sha256 thread, fdatasync, rename, folder fsync, a one-row SQLite commit; no
parsing, no Q/R index, no records). pacs serve cannot be faster than (c) on this machine, so
(c)'s ratio to storescp bounds what the target asks of it in this run.

Then sends them once more to `/usr/bin/storescp --ignore`, which stores nothing: storescu's
and the network's own time, the floor under every receiver.

Prints instances/s and MB/s of each (the median run by rate), and the ratio pacs/storescp
against the target (>= 0.5x). Checks that every instance arrived: files on both sides, and
for pacs the rows of `SELECT count(*) FROM instances` in TMP/index.sqlite and the `ok` records
it printed. Servers are stopped on exit, Ctrl-C or SIGTERM.

Exit status: 0 all arrived and the target is met; 1 all arrived but the target is missed;
2 something did not arrive or a tool failed.

The helpers here (servers, storescu, counting) are shared by bench_store.py and bench_memory.py.
DCMTK tools are run by their /usr/bin path: pynetdicom installs Python scripts of the same
names (storescp, storescu, ...) that may come first on PATH.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Protocol, TypeVar

# `python scripts/bench_serve.py` puts scripts/ on sys.path but not the repository: add it, so the
# `scripts.` imports below work however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.benchdata import make_ct_series

REPO = Path(__file__).resolve().parent.parent
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
DCMSEND = "/usr/bin/dcmsend"
PACS_AET = "PACSCLI"
STORESCP_AET = "STORESCP"
# DCMTK disables Nagle's algorithm only when this is set; without it every C-STORE waits
# ~40 ms for a delayed ACK.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
SERVE_TARGET = 0.5

_RUNNING: list[subprocess.Popen[bytes]] = []


# --- processes -----------------------------------------------------------------------------

def stop_all() -> None:
    """Stop every server this script started and has not stopped yet."""
    for proc in list(_RUNNING):
        stop_process(proc)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def install_cleanup() -> None:
    """Stop every server we started when the script ends, however it ends."""
    atexit.register(stop_all)
    signal.signal(signal.SIGTERM, _on_sigterm)


def require_tools(*tools: str) -> None:
    """Exit with a clear message when a DCMTK tool is missing."""
    missing = [t for t in tools if not os.access(t, os.X_OK)]
    if missing:
        sys.exit(f"missing {', '.join(missing)}: install DCMTK (apt-get install dcmtk)")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout` s; return the exit status."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc in _RUNNING:
        _RUNNING.remove(proc)
    return proc.returncode


@dataclass
class Server:
    """A DICOM server we started: its process, port, AE title and log files."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    aet: str
    stdout: Path
    stderr: Path

    def stop(self) -> int | None:
        """Stop the server (SIGTERM: pacs serve finishes transfers in flight)."""
        return stop_process(self.proc)

    def log_tail(self, lines: int = 15) -> str:
        """The end of its stderr, for error messages."""
        try:
            text = self.stderr.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def start_server(name: str, cmd: Sequence[str], port: int, aet: str, logdir: Path,
                 env: dict[str, str] | None = None, timeout: float = 30.0) -> Server:
    """Start a DICOM server and wait until it answers a C-ECHO."""
    logdir.mkdir(parents=True, exist_ok=True)
    stdout, stderr = logdir / f"{name}.out", logdir / f"{name}.err"
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen(list(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=env, cwd=REPO)
    _RUNNING.append(proc)
    server = Server(name, proc, port, aet, stdout, stderr)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with status {proc.returncode} before listening:\n"
                               f"{server.log_tail()}")
        # A C-ECHO rather than a bare TCP connect: pynetdicom keeps a silent connection
        # as an association until its ACSE timeout.
        probe = subprocess.run([ECHOSCU, "-aec", aet, "-to", "2", "127.0.0.1", str(port)],
                               capture_output=True, env=DCMTK_ENV)
        if probe.returncode == 0:
            return server
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"{name} did not answer C-ECHO on port {port} within {timeout:.0f} s:\n"
                       f"{server.log_tail()}")


def start_pacs_serve(archive: Path, logdir: Path, durability: str | None = None,
                     name: str = "pacs-serve") -> Server:
    """`python -m pacscli serve` on a free port of 127.0.0.1, with an empty config file."""
    port = free_port()
    config = logdir / "empty-config.toml"
    logdir.mkdir(parents=True, exist_ok=True)
    config.write_text("")  # default settings, whatever the user's own config says
    cmd = [sys.executable, "-m", "pacscli", "serve", "--archive", str(archive), "--port", str(port),
           "--bind", "127.0.0.1", "--format", "jsonl", "--config", str(config)]
    if durability is not None:
        cmd += ["--durability", durability]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}
    return start_server(name, cmd, port, PACS_AET, logdir, env=env)


def start_storescp(outdir: Path, logdir: Path, fork: bool = False,
                   name: str = "storescp") -> Server:
    """`/usr/bin/storescp +B -od OUTDIR PORT` (bit-preserving) on a free port."""
    outdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    cmd = [STORESCP, "+B", "-od", str(outdir), "-aet", STORESCP_AET]
    if fork:
        cmd.append("--fork")
    return start_server(name, [*cmd, str(port)], port, STORESCP_AET, logdir, env=DCMTK_ENV)


# --- sending and counting ------------------------------------------------------------------

@dataclass
class Sent:
    """One timed transfer."""

    seconds: float
    returncode: int
    output: str


def run_timed(cmd: Sequence[str], env: dict[str, str] | None = None,
              stdout: Path | None = None) -> Sent:
    """Run a sender to completion; wall-clock time from start to exit.

    Starts from a quiet disk: storescp leaves its files to the kernel's writeback, which
    would otherwise run during, and be charged to, whichever transfer comes next.
    """
    os.sync()
    start = time.perf_counter()
    if stdout is None:
        done = subprocess.run(list(cmd), capture_output=True, env=env, cwd=REPO,
                              stdin=subprocess.DEVNULL)
        output = (done.stdout + done.stderr).decode(errors="replace")
    else:
        with open(stdout, "wb") as out:
            done = subprocess.run(list(cmd), stdout=out, stderr=subprocess.PIPE, env=env, cwd=REPO,
                                  stdin=subprocess.DEVNULL)
        output = done.stderr.decode(errors="replace")
    return Sent(time.perf_counter() - start, done.returncode, output)


def storescu(folder: Path, server: Server) -> Sent:
    """`TCP_NODELAY=1 /usr/bin/storescu -aec AET +sd FOLDER +sp '*.dcm' 127.0.0.1 PORT`."""
    return run_timed([STORESCU, "-aec", server.aet, "+sd", "+sp", "*.dcm", "127.0.0.1",
                      str(server.port), str(folder)], env=DCMTK_ENV)


def count_files(folder: Path) -> int:
    """Regular files under `folder`, recursively, outside dot-folders."""
    total = 0
    for _root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        total += len(files)
    return total


def index_rows(archive: Path) -> int:
    """`SELECT count(*) FROM instances` in the archive's index (-1 when there is none)."""
    path = archive / "index.sqlite"
    if not path.exists():
        return -1
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])
    finally:
        conn.close()


def ok_records(jsonl: Path) -> int:
    """Lines of a JSON-lines file whose status is ok."""
    count = 0
    for line in jsonl.read_text(errors="replace").splitlines():
        if line.strip():
            with contextlib.suppress(ValueError, AttributeError):
                count += json.loads(line).get("status") == "ok"
    return count


def tree_bytes(paths: Sequence[Path]) -> int:
    """Total size of some files."""
    return sum(p.stat().st_size for p in paths)


def make_tmp(parent: Path | None, prefix: str) -> Path:
    """A fresh temporary folder (under `parent` when given)."""
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=parent))


def cores() -> str:
    """'N cores' of this machine (usable by this process)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 0
    return f"{n} core{'s' if n != 1 else ''}"


# --- the benchmark -------------------------------------------------------------------------

@dataclass
class Run:
    """One receiver's result in one run."""

    seconds: float
    files: int
    rows: int | None = None
    records: int | None = None

    def rate(self, count: int) -> float:
        """Instances per second."""
        return count / self.seconds


def transfer(data: Path, server: Server, what: str) -> Sent:
    """storescu of `data` to `server`, stopped after (a warning when it then fails); a
    RuntimeError naming `what` with both sides' output when storescu failed."""
    try:
        sent = storescu(data, server)
    finally:
        status = server.stop()
    if sent.returncode != 0:
        raise RuntimeError(f"storescu to {what} failed ({sent.returncode}):\n{sent.output[-2000:]}"
                           f"\n--- {what} stderr:\n{server.log_tail()}")
    if status not in (0, None, -signal.SIGTERM):
        print(f"warning: {what} exited with status {status}:\n{server.log_tail()}", file=sys.stderr)
    return sent


def run_storescp(data: Path, work: Path, run: int) -> Run:
    """One transfer to a fresh storescp."""
    outdir = work / f"storescp-{run}"
    server = start_storescp(outdir, work / "logs", name=f"storescp-{run}")
    return Run(transfer(data, server, "storescp").seconds, count_files(outdir))


def run_sender_alone(data: Path, work: Path) -> float:
    """Seconds of one transfer to `storescp --ignore`, which receives and stores nothing: what
    storescu and the network take by themselves, the floor under every receiver."""
    port = free_port()
    server = start_server("storescp-ignore", [STORESCP, "--ignore", "-aet", STORESCP_AET,
                                              str(port)], port, STORESCP_AET, work / "logs",
                          env=DCMTK_ENV)
    return transfer(data, server, "storescp --ignore").seconds


def run_floor(data: Path, work: Path, run: int) -> Run:
    """One transfer to a fresh scripts/floor_receiver.py."""
    folder = work / f"floor-{run}"
    port = free_port()
    server = start_server(f"floor-{run}", [sys.executable, str(REPO / "scripts" / "floor_receiver.py"),
                                           "--port", str(port), "--dir", str(folder)],
                          port, PACS_AET, work / "logs")
    return Run(transfer(data, server, "floor_receiver.py").seconds, count_files(folder / "files"))


def run_pacs(data: Path, work: Path, run: int, durability: str | None) -> Run:
    """One transfer to a fresh `pacs serve` archive."""
    archive = work / f"archive-{run}"
    server = start_pacs_serve(archive, work / "logs", durability, name=f"pacs-serve-{run}")
    sent = transfer(data, server, "pacs serve")
    return Run(sent.seconds, count_files(archive / "studies"), index_rows(archive),
               ok_records(server.stdout))


class Timed(Protocol):
    """Anything with a duration."""

    seconds: float


TimedT = TypeVar("TimedT", bound=Timed)


def median_run(runs: list[TimedT]) -> TimedT:
    """The run of median duration (the lower middle one for an even number)."""
    ordered = sorted(runs, key=lambda r: r.seconds)
    return ordered[(len(ordered) - 1) // 2]


def run_in(work: Path, keep: bool, name: str, measure: Callable[[], int]) -> int:
    """A benchmark's exit status from `measure`, run with its working folder `work`: an error
    (RuntimeError) is status 2 with its message; servers are stopped and the folder removed
    (or kept) after, whatever happens."""
    try:
        return measure()
    except RuntimeError as exc:
        print(f"{name}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_all()
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1000, help="CT images to send (default 1000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per receiver; the median run is reported (default 3)")
    parser.add_argument("--durability", choices=["fsync", "none"], default=None,
                        help="pass --durability to pacs serve (default: its own default, fsync)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--tmp", type=Path, default=None,
                        help="where to make the temporary folder (default: the system's)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        parser.error("--count and --repeat must be at least 1")
    require_tools(STORESCU, STORESCP, ECHOSCU)
    install_cleanup()

    work = make_tmp(args.tmp, "bench-serve-")

    def measure() -> int:
        t0 = time.perf_counter()
        paths = make_ct_series(work / "data", args.count)
        size = tree_bytes(paths)
        mb = size / 1e6
        print(f"bench_serve: {args.count} CT images 512x512 16-bit, {mb:.1f} MB, written in "
              f"{time.perf_counter() - t0:.1f} s to {work / 'data'}; {cores()}, "
              f"{args.repeat} run(s) per receiver, median run reported", flush=True)

        dcmtk_runs: list[Run] = []
        pacs_runs: list[Run] = []
        floor_runs: list[Run] = []
        receivers = ["storescp", "pacs", "floor"]
        for n in range(args.repeat):
            for which in receivers[n % 3:] + receivers[:n % 3]:
                if which == "storescp":
                    result = run_storescp(work / "data", work, n)
                    dcmtk_runs.append(result)
                elif which == "pacs":
                    result = run_pacs(work / "data", work, n, args.durability)
                    pacs_runs.append(result)
                else:
                    result = run_floor(work / "data", work, n)
                    floor_runs.append(result)
                extra = "" if result.rows is None else f", {result.rows} index rows"
                print(f"  run {n + 1} {which:<9} {result.seconds:7.2f} s  "
                      f"{result.rate(args.count):7.1f} instances/s  {result.files} files{extra}",
                      flush=True)

        alone = run_sender_alone(work / "data", work)
        print(f"  storescu alone (to storescp --ignore, nothing stored): {alone:.2f} s, "
              f"{args.count / alone:.1f} instances/s", flush=True)

        dcmtk, pacs, least = median_run(dcmtk_runs), median_run(pacs_runs), median_run(floor_runs)
        mode = f"durability={args.durability}" if args.durability else "default settings"
        print(f"DCMTK storescp +B{'':<{len(mode) - 3}}: {dcmtk.rate(args.count):7.1f} instances/s  "
              f"{mb / dcmtk.seconds:6.1f} MB/s  ({dcmtk.seconds:.2f} s)")
        print(f"pacs serve ({mode}) : {pacs.rate(args.count):7.1f} instances/s  "
              f"{mb / pacs.seconds:6.1f} MB/s  ({pacs.seconds:.2f} s)")
        print(f"floor_receiver.py{'':<{len(mode) - 3}}: {least.rate(args.count):7.1f} instances/s  "
              f"{mb / least.seconds:6.1f} MB/s  ({least.seconds:.2f} s)")
        ratio = dcmtk.seconds / pacs.seconds
        met = ratio >= SERVE_TARGET
        print(f"ratio pacs/storescp: {ratio:.2f}x  (target >= {SERVE_TARGET}x: "
              f"{'met' if met else 'NOT met'})")
        print(f"ratio floor_receiver.py/storescp: {dcmtk.seconds / least.seconds:.2f}x  (pacs serve does "
              f"all it does and more: its ratio cannot exceed this); pacs/floor_receiver.py: "
              f"{least.seconds / pacs.seconds:.2f}x")

        problems = []
        for i, r in enumerate(dcmtk_runs, 1):
            if r.files != args.count:
                problems.append(f"run {i}: storescp wrote {r.files} of {args.count} files")
        for i, r in enumerate(floor_runs, 1):
            if r.files != args.count:
                problems.append(f"run {i}: floor_receiver.py wrote {r.files} of {args.count} files")
        for i, r in enumerate(pacs_runs, 1):
            if r.files != args.count:
                problems.append(f"run {i}: pacs archived {r.files} of {args.count} files")
            if r.rows != args.count:
                problems.append(f"run {i}: pacs index has {r.rows} of {args.count} rows")
            if r.records != args.count:
                problems.append(f"run {i}: pacs printed {r.records} ok records of {args.count}")
        if problems:
            print("CHECK FAILED: " + "; ".join(problems))
            return 2
        print(f"check: all {args.count} arrived at every receiver in every run "
              f"(storescp and floor files; pacs files, index rows and ok records)")
        return 0 if met else 1

    return run_in(work, args.keep, "bench_serve", measure)


if __name__ == "__main__":
    sys.exit(main())
