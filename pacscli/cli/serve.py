"""`pacs serve`: run the DICOM SCP over the archive until SIGINT/SIGTERM."""

from __future__ import annotations

import dataclasses
import signal
import sys
import threading
import time
from typing import Annotated

import typer

from pacscli.cli.common import (
    AetOpt,
    ArchiveOpt,
    BackgroundOutput,
    ConfigOpt,
    DicomJsonOpt,
    FormatOpt,
    TlsOpt,
    VerboseOpt,
    get_settings,
    run,
    setup_logging,
)

COLUMNS = ["status", "remote", "PatientID", "SOPInstanceUID", "outcome", "error"]


def serve(
    port: Annotated[int | None, typer.Option(
        "--port", min=0, max=65535,
        help="TCP port (default: serve.port in the config, else 11112)")] = None,
    bind: Annotated[str | None, typer.Option(
        "--bind", help="Address to listen on (default: all interfaces)")] = None,
    allow: Annotated[list[str] | None, typer.Option(
        "--allow", help="Calling AE title to let in (repeatable); others are rejected")] = None,
    any_called_aet: Annotated[bool, typer.Option(
        "--any-called-aet", help="Accept associations whatever called AE title they name")] = False,
    durability: Annotated[str | None, typer.Option(
        "--durability", help="fsync (default: survive a power cut) or none (faster)")] = None,
    on_conflict: Annotated[str | None, typer.Option(
        "--on-conflict", help="A changed instance with a known UID: keep (default) or replace")] = None,
    archive: ArchiveOpt = None,
    aet: AetOpt = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = None,
    tls: TlsOpt = False,
    dicom_json: DicomJsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Receive and serve DICOM: C-ECHO, C-STORE of every storage class and transfer syntax,
    and C-FIND, C-MOVE and C-GET over the archive.

    One record per received instance on stdout; logs on stderr. SIGINT or SIGTERM stops
    accepting, lets transfers in flight finish, and exits 0.
    """
    setup_logging(verbose)

    def body() -> int:
        from pacscli.archive.archive import Archive
        from pacscli.errors import UsageError
        from pacscli.net.scp import DicomServer

        settings = get_settings(config, archive, aet)
        serve_settings = settings.serve
        if allow:
            from pacscli.config import validate_ae_title

            serve_settings = dataclasses.replace(
                serve_settings, allow=tuple(validate_ae_title(a) for a in allow))
        if any_called_aet:
            serve_settings = dataclasses.replace(serve_settings, require_called_aet=False)
        if tls:
            serve_settings = dataclasses.replace(serve_settings, tls=True)
        storage = settings.storage
        if durability is not None:
            if durability not in ("fsync", "none"):
                raise UsageError("--durability must be fsync or none")
            storage = dataclasses.replace(storage, durability=durability)  # type: ignore[arg-type]
        if on_conflict is not None:
            if on_conflict not in ("keep", "replace"):
                raise UsageError("--on-conflict must be keep or replace")
            storage = dataclasses.replace(storage, on_conflict=on_conflict)  # type: ignore[arg-type]
        settings = settings.with_changes(serve=serve_settings, storage=storage)

        # The archive is the job, the records a courtesy: a reader that stops reading, or
        # goes away (`pacs serve | jq` and jq ends), never holds up receiving.
        out = BackgroundOutput(fmt, COLUMNS, fd=sys.stdout.fileno(), dicom_json=dicom_json)
        store = Archive(settings.archive, settings.storage)
        server = DicomServer(settings, store, out.emit)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        host, bound = server.start(bind if bind is not None else serve_settings.bind,
                                   port if port is not None else serve_settings.port)
        typer.echo(f"pacs serve: {settings.ae_title} listening on {host or '*'}:{bound}, "
                   f"archive {store.root}", err=True)
        stopping: float | None = None
        try:
            while not stop.wait(0.5):
                pass
            stopping = time.monotonic()
            typer.echo("pacs serve: stopping; letting transfers in flight finish", err=True)
            server.stop(grace=12.0)
        finally:
            store.close()
            # the records that wait, written while the writing moves on, within the 15 s a
            # stop may take
            out.close(deadline=(stopping or time.monotonic()) + 13.5)
        return 0

    raise typer.Exit(run(body))
