"""Benchmark C-GET and C-MOVE from `pacs serve` against DCMTK's dcmqrscp, same files, same run.

Usage: python scripts/bench_retrieve.py [--count N] [--repeat R] [--keep] [--tmp DIR]

Writes N synthetic CT slices (512x512, 16-bit; default 1,000) of one series, loads them
into (a) `pacs serve`'s archive (C-STORE with storescu) and (b) dcmqrscp's storage area
(C-STORE with storescu to dcmqrscp itself), then R times (default 3) retrieves the series:

  C-GET:  TCP_NODELAY=1 /usr/bin/getscu -S -od DIR ... (the instances come back on the
          requesting association and getscu writes them)
  C-MOVE: TCP_NODELAY=1 /usr/bin/movescu -S -aem STORESCP ... to one DCMTK storescp +B

Prints instances/s of each (median run) and the ratios pacs/dcmqrscp against the target
(>= 0.7x). Exit status: 0 target met, 1 missed, 2 something did not arrive or failed.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

# `python scripts/bench_retrieve.py` puts scripts/ on sys.path but not the repository: add it, so the
# `scripts.` imports below work however the script is started.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts import bench_serve as bench
from scripts.benchdata import make_ct_series

GETSCU, MOVESCU, DCMQRSCP = "/usr/bin/getscu", "/usr/bin/movescu", "/usr/bin/dcmqrscp"
TARGET = 0.7


def start_dcmqrscp(work: Path, dest_port: int) -> bench.Server:
    """dcmqrscp (AE QRSCP) with STORESCP as its move destination."""
    storage = work / "db"
    storage.mkdir(parents=True, exist_ok=True)
    port = bench.free_port()
    config = work / "dcmqrscp.cfg"
    config.write_text(
        f"NetworkTCPPort = {port}\nMaxPDUSize = 131072\nMaxAssociations = 16\n\n"
        f"HostTable BEGIN\ndest = ({bench.STORESCP_AET}, 127.0.0.1, {dest_port})\nHostTable END\n\n"
        "VendorTable BEGIN\nVendorTable END\n\n"
        f"AETable BEGIN\nQRSCP {storage} RW (2000, 4096mb) ANY\nAETable END\n")
    return bench.start_server("dcmqrscp", [DCMQRSCP, "-c", str(config), str(port)], port, "QRSCP",
                              work, env=bench.DCMTK_ENV)


def keys(study: str, series: str) -> list[str]:
    return ["-k", "QueryRetrieveLevel=SERIES", "-k", f"StudyInstanceUID={study}",
            "-k", f"SeriesInstanceUID={series}"]


def get(server: bench.Server, out: Path, study: str, series: str) -> bench.Sent:
    out.mkdir(parents=True, exist_ok=True)
    return bench.run_timed([GETSCU, "-S", "-aec", server.aet, "-od", str(out), *keys(study, series),
                            "127.0.0.1", str(server.port)], env=bench.DCMTK_ENV)


def move(server: bench.Server, study: str, series: str) -> bench.Sent:
    return bench.run_timed([MOVESCU, "-S", "-aec", server.aet, "-aem", bench.STORESCP_AET,
                            *keys(study, series), "127.0.0.1", str(server.port)], env=bench.DCMTK_ENV)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--tmp", type=Path)
    args = parser.parse_args(argv)
    bench.install_cleanup()
    bench.require_tools(GETSCU, MOVESCU, DCMQRSCP, bench.STORESCU, bench.STORESCP)
    work = bench.make_tmp(args.tmp, "bench-retrieve-")
    try:
        paths = make_ct_series(work / "data", args.count)
        import pydicom

        first = pydicom.dcmread(paths[0], stop_before_pixels=True)
        study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
        dest = bench.start_storescp(work / "dest", work / "logs")
        config = work / "pacs-config.toml"
        config.write_text(f'[remotes.DEST]\nae_title = "{bench.STORESCP_AET}"\nhost = "127.0.0.1"\n'
                          f"port = {dest.port}\n")
        port = bench.free_port()
        pacs = bench.start_server("pacs-serve", [
            sys.executable, "-m", "pacscli", "serve", "--archive", str(work / "archive"),
            "--port", str(port), "--bind", "127.0.0.1", "--format", "jsonl", "--config", str(config),
        ], port, bench.PACS_AET, work / "logs")
        qr = start_dcmqrscp(work / "qr", dest.port)
        for server in (pacs, qr):
            sent = bench.storescu(work / "data", server)
            if sent.returncode != 0:
                print(f"loading {server.name} failed:\n{sent.output[-2000:]}", file=sys.stderr)
                return 2
        rates: dict[str, list[float]] = {}
        for run in range(args.repeat):
            for server in (pacs, qr) if run % 2 == 0 else (qr, pacs):
                out = work / f"get-{server.name}-{run}"
                got = get(server, out, study, series)
                received = bench.count_files(out)
                if got.returncode != 0 or received != args.count:
                    print(f"C-GET from {server.name}: {received} of {args.count} arrived\n"
                          f"{got.output[-2000:]}", file=sys.stderr)
                    return 2
                rates.setdefault(f"C-GET {server.name}", []).append(args.count / got.seconds)
                shutil.rmtree(out)
                shutil.rmtree(work / "dest", ignore_errors=True)
                (work / "dest").mkdir()
                moved = move(server, study, series)
                arrived = bench.count_files(work / "dest")
                if moved.returncode != 0 or arrived != args.count:
                    print(f"C-MOVE from {server.name}: {arrived} of {args.count} arrived\n"
                          f"{moved.output[-2000:]}", file=sys.stderr)
                    return 2
                rates.setdefault(f"C-MOVE {server.name}", []).append(args.count / moved.seconds)
        print(f"{args.count} CT instances (512x512, 16-bit), one series; median of {args.repeat} runs; "
              f"{bench.cores()}")
        met = True
        for op in ("C-GET", "C-MOVE"):
            ours = statistics.median(rates[f"{op} pacs-serve"])
            theirs = statistics.median(rates[f"{op} dcmqrscp"])
            ratio = ours / theirs
            met &= ratio >= TARGET
            print(f"{op:7s} pacs serve {ours:7.1f} inst/s   dcmqrscp {theirs:7.1f} inst/s   "
                  f"ratio {ratio:.2f}x (target >= {TARGET}x)")
        return 0 if met else 1
    finally:
        bench.stop_all()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
