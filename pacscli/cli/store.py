"""`pacs store`: C-STORE files, folders or stdin records to a remote."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from pacscli.cli.common import (
    AetOpt,
    ArchiveOpt,
    ConfigOpt,
    DicomJsonOpt,
    FormatOpt,
    Output,
    TlsOpt,
    VerboseOpt,
    get_settings,
    input_records,
    progress_bar,
    quiet_pydicom,
    run,
    setup_logging,
)

if TYPE_CHECKING:
    from pacscli.archive.index import Index
    from pacscli.records import Record

COLUMNS = ["status", "path", "SOPInstanceUID", "transfer_syntax", "converted_from",
           "dimse_status", "fixed", "error", "reason"]
TABLE_COLUMNS = ["status", "path", "SOPInstanceUID", "transfer_syntax", "error", "reason"]


def store(
    remote: Annotated[str, typer.Argument(metavar="REMOTE", show_default=False,
                                          help="AET@HOST:PORT or a remote's name from the config")],
    paths: Annotated[list[str] | None, typer.Argument(
        metavar="PATH", show_default=False,
        help="Files or folders (recursive); '-' or none reads JSON lines with 'path' from stdin")
    ] = None,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=1,
                                      help="Parallel associations")] = 1,
    archive: ArchiveOpt = None,
    aet: AetOpt = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = None,
    tls: TlsOpt = False,
    dicom_json: DicomJsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """C-STORE DICOM files to a remote: one result record per file.

    Files go out as stored if the peer takes their syntax, else decompressed (Explicit VR LE).
    Non-DICOM files are skipped. A stdin record without a path (`pacs find --archive`'s)
    sends the archive's instances of what its UIDs name, at its QueryRetrieveLevel.

    Exit 0: all sent (or an empty pipe: nothing to send); 1: some failed; 2: no input;
    3: could not associate.
    """
    setup_logging(verbose)

    def body() -> int:
        from pacscli.net.store import store as send

        quiet_pydicom(verbose)  # the records say what was fixed in dirty files

        settings = get_settings(config, archive, aet)
        target = settings.remote(remote, tls=tls)
        out = Output(fmt, COLUMNS, dicom_json=dicom_json)
        if out.format == "table":
            out.columns = TABLE_COLUMNS
        progress, close_bar = progress_bar()
        index: Index | None = None

        def resolve(record: Record) -> list[Path]:
            # Opened for the first record without a path: a store of files never loads it.
            nonlocal index
            from pacscli.archive.query import files_for_record, open_index, record_level

            level = record_level(record)  # a record without UIDs fails as such, archive or none
            if index is None:
                index = open_index(settings.archive)
            return files_for_record(index, record, level)

        try:
            out.emit_all(send(settings, target, input_records(paths), jobs=jobs,
                              progress=progress, resolve=resolve))
        finally:
            close_bar()
            out.close()
            if index is not None:
                index.close()
        return out.exit_code()

    raise typer.Exit(run(body))
