"""`pacs move`: C-MOVE studies, series or instances from a remote to a destination AE, or with
`--receive` into the archive through a storage SCP run in the same process."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer

from pacscli.cli.common import (
    AetOpt,
    ArchiveOpt,
    ConfigOpt,
    FormatOpt,
    Output,
    TlsOpt,
    VerboseOpt,
    get_settings,
    input_records,
    progress_bar,
    run,
    setup_logging,
)

COLUMNS = ["status", "QueryRetrieveLevel", "PatientID", "StudyInstanceUID", "SeriesInstanceUID",
           "SOPInstanceUID", "remote", "dest", "dimse_status", "completed", "failed", "warning",
           "received", "elapsed_ms", "error"]
TABLE_COLUMNS = ["status", "QueryRetrieveLevel", "StudyInstanceUID", "SeriesInstanceUID",
                 "SOPInstanceUID", "completed", "failed", "warning", "received", "error"]

PatientOpt = Annotated[list[str] | None, typer.Option(
    "--patient", show_default=False, help="Patient ID to retrieve (Patient Root; repeatable)")]
StudyOpt = Annotated[list[str] | None, typer.Option(
    "--study", show_default=False, help="Study Instance UID to retrieve (repeatable)")]
SeriesOpt = Annotated[list[str] | None, typer.Option(
    "--series", show_default=False,
    help="Series Instance UID to retrieve (repeatable; with one --study as their parent)")]
InstanceOpt = Annotated[list[str] | None, typer.Option(
    "--instance", show_default=False,
    help="SOP Instance UID to retrieve (repeatable; with one --series/--study as parents)")]
LevelOpt = Annotated[str | None, typer.Option(
    "--level", "-l", show_default=False,
    help="Retrieve at this level instead of each record's QueryRetrieveLevel "
         "(e.g. whole studies for series records)")]
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="Information model: study (Study Root) or patient (Patient Root)")]


# `-` as the one input argument: read the records from stdin, as every command that acts on
# studies does (DESIGN.md section 2); also the default when stdin is not a terminal.
StdinArg = Annotated[str | None, typer.Argument(
    metavar="[-]", show_default=False,
    help="- reads records from stdin (the default when stdin is not a terminal)")]


def requests(patients: list[str] | None, studies: list[str] | None, series: list[str] | None,
             instances: list[str] | None, level: str | None, model: str,
             stdin: str | None = None) -> Any:
    """Retrieve requests from the UID options, else from stdin records (UsageError if none).
    `stdin` is the input argument: None, or "-" to read stdin even from a terminal."""
    from pacscli.dicom.query import check_level
    from pacscli.errors import UsageError
    from pacscli.net.qr import requests_from_records, requests_from_uids

    if stdin not in (None, "-"):
        raise UsageError(f"unexpected input {stdin!r}: the only input argument is - (records on "
                         "stdin); give UIDs with --study/--series/--instance")
    check_level(level or "study", model)
    if patients and not (studies or series or instances):
        check_level("patient", model)
    if patients or studies or series or instances:
        if stdin:
            raise UsageError("give --study/--series/--instance UIDs or - (stdin records), not both")
        if level:
            raise UsageError("--level applies to stdin records, not to --study/--series/...")
        return requests_from_uids(patients=patients or (), studies=studies or (),
                                  series=series or (), instances=instances or ())
    if sys.stdin.isatty() and not stdin:
        raise UsageError("nothing to retrieve: give --study/--series/--instance UIDs or pipe "
                         "records (e.g. from `pacs find`) into stdin")
    return requests_from_records(input_records(["-"]), level)


def move(
    remote: Annotated[str, typer.Argument(metavar="REMOTE", show_default=False,
                                          help="AET@HOST:PORT or a remote's name from the config")],
    stdin: StdinArg = None,
    dest: Annotated[str | None, typer.Option(
        "--dest", show_default=False,
        help="AE title the remote sends to (it must know its address); default with "
             "--receive: our AE title")] = None,
    receive: Annotated[bool, typer.Option(
        "--receive", help="Receive the instances here, into the archive, with a storage SCP "
                          "run for the duration of the command")] = False,
    port: Annotated[int | None, typer.Option(
        "--port", min=0, max=65535, show_default=False,
        help="Port the --receive storage SCP listens on (the one the remote knows for the "
             "destination) (default: serve.port, 11112)")] = None,
    bind: Annotated[str, typer.Option(
        "--bind", help="Address the --receive storage SCP listens on (default: all)")] = "",
    patient: PatientOpt = None,
    study: StudyOpt = None,
    series: SeriesOpt = None,
    instance: InstanceOpt = None,
    level: LevelOpt = None,
    model: ModelOpt = "study",
    archive: ArchiveOpt = None,
    aet: AetOpt = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = None,
    tls: TlsOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """C-MOVE from a remote to --dest, for stdin records (their QueryRetrieveLevel and UIDs,
    e.g. from `pacs find`) or --study/--series/--instance UIDs.

    With --receive the instances come here: a storage SCP answering to our AE title runs in
    this process on --port and puts them into the archive. One record per request with the
    remote's completed, failed and warning counts.

    Exit 0: all moved; 1: some requests or instances failed; 2: bad input; 3: cannot connect;
    4: the remote refused every request (e.g. 0xA801, move destination unknown).
    """
    setup_logging(verbose)

    def body() -> int:
        from pacscli.errors import UsageError
        from pacscli.net.move import StorageReceiver
        from pacscli.net.move import move as c_move

        settings = get_settings(config, archive, aet)
        target = settings.remote(remote, tls=tls)
        destination = dest or (settings.ae_title if receive else None)
        if destination is None:
            raise UsageError("give --dest AET (the AE title the remote sends to), or --receive "
                             "to receive here into the archive")
        inputs = requests(patient, study, series, instance, level, model, stdin)
        out = Output(fmt, COLUMNS)
        if out.format == "table":
            out.columns = TABLE_COLUMNS
        elif not receive:
            out.columns = [c for c in COLUMNS if c != "received"]
        receiver = store = None
        receiving = None
        progress, close_bar = progress_bar("instance")
        try:
            if receive:
                from pacscli.archive.archive import Archive

                store = Archive(settings.archive, settings.storage)
                receiver = StorageReceiver(settings, store, destination, tls=target.tls)
                receiving = receiver.start(bind, port if port is not None else settings.serve.port)
                if verbose:
                    typer.echo(f"pacs move: receiving as {destination} on "
                               f"{receiving[0] or '*'}:{receiving[1]} into {store.root}", err=True)
            out.emit_all(c_move(settings, target, inputs, destination, model=model,
                                receiver=receiver, receiving=receiving, progress=progress))
        finally:
            close_bar()
            out.close()
            if receiver is not None:
                receiver.stop()
            if store is not None:
                store.close()
        if not out.counts:
            raise UsageError("no input records: nothing to move", code="no-input")
        return out.exit_code()

    raise typer.Exit(run(body))
