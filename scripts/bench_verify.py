"""Benchmark `pacs verify` (full check) against `sha256sum` over the same files.

Usage: python scripts/bench_verify.py [--count N] [--repeat R] [--jobs J] [--rows N]
                                      [--keep] [--tmp DIR]

Writes N synthetic CT slices (ROWS x ROWS, 16-bit, Explicit VR Little Endian; default 10,000
of 64x64) with scripts/benchdata.make_ct_series, puts them into a fresh archive with
`pacs index`, then, R times (default 3; the order alternates between runs), reads them all
back with

  (a) `python -m pacscli verify --archive A --format jsonl [--jobs J]`: size, sha256,
      structural parse and UIDs of every indexed file, plus the search for unindexed and
      leftover files (timed from the start of the Python process to its exit);
  (b) `xargs -0 -a LIST sha256sum` over the archived files (listed beforehand; xargs splits
      the list into a few sha256sum processes), output to /dev/null.

Both read from the page cache (the files were just written). Prints files/s and MB/s of each
(the median run by duration) and the ratio pacs/sha256sum against the target (>= 0.8x).
Checks that `pacs verify` exited 0 with a summary of N files and no problem, and that
sha256sum exited 0.

Exit status: 0 the target is met; 1 it is missed; 2 something failed (said plainly).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# `python scripts/bench_verify.py` puts scripts/ on sys.path but not the repository: add it, so the
# `scripts.` imports below work however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.bench_serve import cores, make_tmp, median_run, run_timed, tree_bytes
from scripts.benchdata import make_ct_series

VERIFY_TARGET = 0.8


@dataclass
class Run:
    seconds: float


def pacs(*args: str, config: Path) -> list[str]:
    return [sys.executable, "-m", "pacscli", *args, "--config", str(config)]


def pacs_env() -> dict[str, str]:
    """Our environment without PACS_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("PACS_")}


def run_verify(archive: Path, work: Path, config: Path, count: int, jobs: int | None,
               quick: bool = False) -> Run:
    cmd = pacs("verify", "--archive", str(archive), "--format", "jsonl", config=config)
    cmd += ["--jobs", str(jobs)] if jobs else []
    cmd += ["--quick"] if quick else []
    out = work / "verify.jsonl"
    done = run_timed(cmd, env=pacs_env(), stdout=out)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    summary = records[-1] if records else {}
    if done.returncode != 0 or summary.get("problems") != 0 or summary.get("indexed") != count:
        raise RuntimeError(f"`pacs verify` exited {done.returncode} with {records[-3:]}: "
                           f"{done.output[-2000:]}")
    return Run(done.seconds)


def run_sha256sum(listing: Path) -> Run:
    began = time.perf_counter()
    done = subprocess.run(["xargs", "-0", "-a", str(listing), "sha256sum"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - began
    if done.returncode != 0:
        raise RuntimeError(f"sha256sum exited {done.returncode}: {done.stderr[-2000:]!r}")
    return Run(seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=10_000, help="files (default 10000)")
    parser.add_argument("--rows", type=int, default=64, help="image rows and columns (64)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per reader; the median run is reported (default 3)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="pass --jobs to pacs verify (default: its own, one per core)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--tmp", type=Path, default=None,
                        help="where to make the temporary folder (default: the system's)")
    args = parser.parse_args(argv)
    if args.count < 1 or args.repeat < 1:
        parser.error("--count and --repeat must be at least 1")
    work = make_tmp(args.tmp, "bench-verify-")
    try:
        files = make_ct_series(work / "data", args.count, rows=args.rows, cols=args.rows)
        config = work / "empty-config.toml"
        config.write_text("")
        archive = work / "archive"
        done = subprocess.run(pacs("index", str(work / "data"), "--archive", str(archive),
                                   "--format", "jsonl", config=config),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=pacs_env(),
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            raise RuntimeError(f"`pacs index` exited {done.returncode}: {done.stderr[-2000:]!r}")
        shutil.rmtree(work / "data")
        archived = sorted(p for p in (archive / "studies").rglob("*") if p.is_file())
        listing = work / "files.list"
        listing.write_bytes(b"".join(bytes(p) + b"\0" for p in archived))
        mb = tree_bytes(archived) / 1e6
        print(f"bench_verify: {len(archived)} archived CT images {args.rows}x{args.rows} "
              f"16-bit, {mb:.1f} MB; {cores()}, {args.repeat} run(s) each, median run "
              f"reported", flush=True)
        if len(archived) != args.count or len(files) != args.count:
            raise RuntimeError(f"{len(archived)} files archived of {args.count}")
        pacs_runs: list[Run] = []
        sums: list[Run] = []
        for run in range(args.repeat):
            order = ("pacs", "sha256sum") if run % 2 == 0 else ("sha256sum", "pacs")
            for who in order:
                os.sync()  # neither reader pays for the writeback of what came before
                if who == "pacs":
                    result = run_verify(archive, work, config, args.count, args.jobs)
                    pacs_runs.append(result)
                else:
                    result = run_sha256sum(listing)
                    sums.append(result)
                print(f"  run {run + 1}: {who:9s} {result.seconds:6.2f} s  "
                      f"{args.count / result.seconds:8.0f} files/s", flush=True)
        quick = run_verify(archive, work, config, args.count, args.jobs, quick=True)
        ours, theirs = median_run(pacs_runs), median_run(sums)
        ratio = theirs.seconds / ours.seconds
        for name, res in (("pacs verify", ours), ("sha256sum", theirs)):
            print(f"{name + ':':12s} {args.count / res.seconds:.0f} files/s, "
                  f"{mb / res.seconds:.0f} MB/s ({res.seconds:.2f} s)")
        print(f"pacs verify --quick: {args.count / quick.seconds:.0f} files/s "
              f"({quick.seconds:.2f} s)")
        met = ratio >= VERIFY_TARGET
        print(f"ratio: {ratio:.2f}x (target >= {VERIFY_TARGET}x: {'met' if met else 'MISSED'})")
        return 0 if met else 1
    except RuntimeError as exc:
        print(f"bench_verify: {exc}")
        return 2
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
