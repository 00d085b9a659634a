"""Benchmark `pacs store` against DCMTK's storescu, both sending to DCMTK's storescp.

Usage: python scripts/bench_store.py [--count N] [--repeat R] [--jobs J] [--keep] [--tmp DIR]

Writes N synthetic CT slices (512x512, 16-bit, Explicit VR Little Endian; default 1,000) with
scripts/benchdata.make_ct_series into a temporary folder, then, R times (default 3; the
order alternates between runs), sends them all to a fresh `/usr/bin/storescp +B -od DIR P`
(bit-preserving; a fresh folder for each transfer) with

  (a) `python -m pacscli store STORESCP@127.0.0.1:P DIR --format jsonl [--jobs J]`
      (timed from the start of the Python process to its exit, start-up included);
  (b) `TCP_NODELAY=1 /usr/bin/storescu +sd DIR +sp '*.dcm'`.

Prints instances/s and MB/s of each (the median run by duration) and the ratio pacs/storescu
against the target (>= 0.7x). Checks that every instance arrived (storescp's files) and that
`pacs store` exited 0 with one `ok` record per file. With --jobs J > 1, storescp runs with
--fork so that it accepts the J associations at once.

Exit status: 0 all arrived and the target is met; 1 all arrived but the target is missed;
2 something did not arrive, or `pacs store` is missing or failed (said plainly on stdout).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# `python scripts/bench_store.py` puts scripts/ on sys.path but not the repository: add it, so the
# `scripts.` imports below work however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_serve import (
    ECHOSCU,
    REPO,
    STORESCP,
    STORESCU,
    cores,
    count_files,
    install_cleanup,
    make_tmp,
    median_run,
    ok_records,
    require_tools,
    run_in,
    run_timed,
    start_storescp,
    stop_process,
    storescu,
    tree_bytes,
)
from scripts.benchdata import make_ct_series

STORE_TARGET = 0.7


@dataclass
class Run:
    """One sender's result in one run."""

    seconds: float
    files: int
    records: int | None = None

    def rate(self, count: int) -> float:
        """Instances per second."""
        return count / self.seconds


class StoreFailed(RuntimeError):
    """`pacs store` is missing or did not do its job."""


def pacs_env() -> dict[str, str]:
    """Our environment without PACS_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}


def check_pacs_store() -> None:
    """Raise StoreFailed when `python -m pacscli store` does not exist."""
    done = subprocess.run([sys.executable, "-m", "pacscli", "store", "--help"], capture_output=True,
                          env=pacs_env(), cwd=REPO, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        text = (done.stdout + done.stderr).decode(errors="replace").strip()
        raise StoreFailed(f"`python -m pacscli store --help` exited {done.returncode}: "
                          f"{text[-800:] or 'no output'}")


def not_ok_records(jsonl: Path) -> list[str]:
    """The lines of a JSON-lines file whose status is not ok."""
    bad = []
    for line in jsonl.read_text(errors="replace").splitlines():
        try:
            ok = json.loads(line).get("status") == "ok"
        except (ValueError, AttributeError):
            ok = False
        if line.strip() and not ok:
            bad.append(line.strip())
    return bad


def count_inputs(data: Path) -> int:
    """Files in the folder sent."""
    return sum(1 for p in data.iterdir() if p.is_file())


def run_storescu(data: Path, work: Path, run: int, fork: bool) -> Run:
    """DCMTK storescu to a fresh storescp."""
    outdir = work / f"storescu-{run}"
    server = start_storescp(outdir, work / "logs", fork=fork, name=f"storescp-storescu-{run}")
    try:
        sent = storescu(data, server)
    finally:
        stop_process(server.proc)
    if sent.returncode != 0:
        raise RuntimeError(f"storescu failed ({sent.returncode}):\n{sent.output[-2000:]}")
    return Run(sent.seconds, count_files(outdir))


def run_pacs_store(data: Path, work: Path, run: int, jobs: int) -> Run:
    """`pacs store` to a fresh storescp."""
    outdir = work / f"pacs-store-{run}"
    logs = work / "logs"
    server = start_storescp(outdir, logs, fork=jobs > 1, name=f"storescp-pacs-{run}")
    config = logs / "empty-config.toml"
    config.write_text("")
    records = logs / f"pacs-store-{run}.jsonl"
    cmd = [sys.executable, "-m", "pacscli", "store", f"{server.aet}@127.0.0.1:{server.port}",
           str(data), "--format", "jsonl", "--config", str(config)]
    if jobs > 1:
        cmd += ["--jobs", str(jobs)]
    try:
        sent = run_timed(cmd, env=pacs_env(), stdout=records)
    finally:
        stop_process(server.proc)
    ok = ok_records(records)
    if sent.returncode != 0:
        bad = not_ok_records(records)
        shown = "".join(f"\n  {line}" for line in bad[:3])
        more = f"\n  ... and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise StoreFailed(f"`pacs store` exited {sent.returncode} after {sent.seconds:.1f} s with "
                          f"{ok} ok records of {count_inputs(data)}; {len(bad)} other record(s)"
                          f"{shown}{more}\nstderr: {sent.output.strip()[-2000:] or '(empty)'}")
    return Run(sent.seconds, count_files(outdir), ok)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1000, help="CT images to send (default 1000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per sender; the median run is reported (default 3)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="pass --jobs to pacs store (default 1: one association, as storescu)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders")
    parser.add_argument("--tmp", type=Path, default=None,
                        help="where to make the temporary folder (default: the system's)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeat < 1 or args.jobs < 1:
        parser.error("--count, --repeat and --jobs must be at least 1")
    require_tools(STORESCU, STORESCP, ECHOSCU)
    install_cleanup()

    work = make_tmp(args.tmp, "bench-store-")

    def measure() -> int:
        dcmtk_runs: list[Run] = []
        pacs_runs: list[Run] = []
        pacs_error: str | None = None
        t0 = time.perf_counter()
        paths = make_ct_series(work / "data", args.count)
        mb = tree_bytes(paths) / 1e6
        print(f"bench_store: {args.count} CT images 512x512 16-bit, {mb:.1f} MB, written in "
              f"{time.perf_counter() - t0:.1f} s to {work / 'data'}; {cores()}, "
              f"{args.repeat} run(s) per sender, median run reported", flush=True)
        try:
            check_pacs_store()
        except StoreFailed as exc:
            pacs_error = str(exc)

        for n in range(args.repeat):
            order = ("storescu", "pacs") if n % 2 == 0 else ("pacs", "storescu")
            for which in order:
                if which == "storescu":
                    result = run_storescu(work / "data", work, n, fork=args.jobs > 1)
                    dcmtk_runs.append(result)
                elif pacs_error is None:
                    try:
                        result = run_pacs_store(work / "data", work, n, args.jobs)
                    except StoreFailed as exc:
                        pacs_error = str(exc)
                        continue
                    pacs_runs.append(result)
                else:
                    continue
                extra = "" if result.records is None else f", {result.records} ok records"
                print(f"  run {n + 1} {which:<9} {result.seconds:7.2f} s  "
                      f"{result.rate(args.count):7.1f} instances/s  {result.files} files{extra}",
                      flush=True)

        dcmtk = median_run(dcmtk_runs)
        jobs = f" --jobs {args.jobs}" if args.jobs > 1 else ""
        label = f"pacs store{jobs}"
        width = max(len(label), len("DCMTK storescu"))
        print(f"{'DCMTK storescu':<{width}} : {dcmtk.rate(args.count):7.1f} instances/s  "
              f"{mb / dcmtk.seconds:6.1f} MB/s  ({dcmtk.seconds:.2f} s)")
        if pacs_error is not None:
            print(f"{label:<{width}} : FAILED, no figure: {pacs_error}")
            print(f"ratio pacs/storescu: not measured (target >= {STORE_TARGET}x)")
            return 2
        pacs = median_run(pacs_runs)
        print(f"{label:<{width}} : {pacs.rate(args.count):7.1f} instances/s  "
              f"{mb / pacs.seconds:6.1f} MB/s  ({pacs.seconds:.2f} s, Python start-up included)")
        ratio = dcmtk.seconds / pacs.seconds
        met = ratio >= STORE_TARGET
        print(f"ratio pacs/storescu: {ratio:.2f}x  (target >= {STORE_TARGET}x: "
              f"{'met' if met else 'NOT met'})")

        problems = []
        for i, r in enumerate(dcmtk_runs, 1):
            if r.files != args.count:
                problems.append(f"run {i}: storescu delivered {r.files} of {args.count} files")
        for i, r in enumerate(pacs_runs, 1):
            if r.files != args.count:
                problems.append(f"run {i}: pacs store delivered {r.files} of {args.count} files")
            if r.records != args.count:
                problems.append(f"run {i}: pacs store printed {r.records} ok records of {args.count}")
        if problems:
            print("CHECK FAILED: " + "; ".join(problems))
            return 2
        print(f"check: all {args.count} arrived at storescp from both senders in every run "
              f"(files; pacs store exit 0 and ok records)")
        return 0 if met else 1

    return run_in(work, args.keep, "bench_store", measure)


if __name__ == "__main__":
    sys.exit(main())
