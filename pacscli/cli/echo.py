"""`pacs echo`: C-ECHO a remote, with timings and a diagnosis of any failure."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from pacscli.cli.common import (
    AetOpt,
    ConfigOpt,
    FormatOpt,
    Output,
    TlsOpt,
    VerboseOpt,
    get_settings,
    run,
    setup_logging,
)
from pacscli.records import Record

COLUMNS = ["echo", "status", "remote", "assoc_ms", "rtt_ms", "dimse_status", "max_pdu",
           "implementation_version_name", "implementation_class_uid", "error"]
# A table on a terminal: what varies per echo; the summary line names the remote and peer.
TABLE_COLUMNS = ["echo", "status", "rtt_ms", "assoc_ms", "dimse_status", "max_pdu",
                 "implementation_version_name", "error"]


def echo(
    remote: Annotated[str, typer.Argument(metavar="REMOTE", show_default=False,
                                          help="AET@HOST:PORT or a remote's name from the config")],
    count: Annotated[int, typer.Option("--count", "-c", min=1,
                                       help="Echoes to send on one association")] = 1,
    interval: Annotated[float, typer.Option("--interval", "-i", min=0.0,
                                            help="Seconds between echoes")] = 0.0,
    timeout: Annotated[float | None, typer.Option(
        "--timeout", show_default=False,
        help="Seconds allowed to connect, to associate and for each response "
             "(default from the config: 10, 30 and 60)")] = None,
    aet: AetOpt = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = None,
    tls: TlsOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """C-ECHO a remote: association time, round trips, the peer's max PDU and implementation.

    One record per echo on stdout; a failure is diagnosed on stderr.

    Exit 0: every echo succeeded; 3: cannot connect, rejected or aborted; 4: failure status.
    """
    setup_logging(verbose)

    def body() -> int:
        from pacscli.net.echo import echo as send_echoes
        from pacscli.net.echo import with_timeout

        settings = get_settings(config, None, aet)
        if timeout is not None:
            settings = with_timeout(settings, timeout)
        target = settings.remote(remote, tls=tls)
        out = Output(fmt, COLUMNS, live=interval > 0)
        if out.format == "table":
            out.columns = TABLE_COLUMNS
        records: list[Record] = []
        try:
            for record in send_echoes(settings, target, count=count, interval=interval):
                records.append(record)
                out.emit(record)
        finally:
            out.close()
        if verbose or sys.stdout.isatty():
            typer.echo(_summary(records), err=True)
        return 0

    raise typer.Exit(run(body, read_only=True))


def _summary(records: list[Record]) -> str:
    """'STORESCP@127.0.0.1:104: 3 echoes ok, association 2.1 ms, round trip min/avg/max ...'."""
    first = records[0]
    rtts = [r["rtt_ms"] for r in records]
    echoes = f"{len(records)} echo{'es' if len(records) > 1 else ''}"
    peer = " ".join(str(first[k]) for k in ("implementation_version_name",
                                            "implementation_class_uid") if first[k])
    return (f"{first['remote']}: {echoes} ok, association {first['assoc_ms']:.1f} ms, "
            f"round trip min/avg/max {min(rtts):.2f}/{sum(rtts) / len(rtts):.2f}/"
            f"{max(rtts):.2f} ms, peer max PDU {first['max_pdu']}, "
            f"implementation {peer or 'not given'}")
