"""`pacs index`: bring existing files into the archive, or rebuild its index from its files."""

from __future__ import annotations

from typing import Annotated

import typer

from pacscli.cli.common import (
    ArchiveOpt,
    ConfigOpt,
    DicomJsonOpt,
    FormatOpt,
    Output,
    QuietOpt,
    VerboseOpt,
    get_settings,
    input_records,
    progress_bar,
    quiet_pydicom,
    run,
    setup_logging,
)

COLUMNS = ["status", "outcome", "path", "SOPInstanceUID", "reason", "error"]


def index(
    paths: Annotated[list[str] | None, typer.Argument(
        metavar="PATH", show_default=False,
        help="Files or folders (recursive; a folder with a DICOMDIR is read through it); "
             "'-' or none reads JSON lines with 'path' from stdin")] = None,
    in_place: Annotated[bool, typer.Option(
        "--in-place", help="Index files where they lie (absolute paths recorded, nothing "
                           "copied): for read-only shares")] = False,
    rebuild: Annotated[bool, typer.Option(
        "--rebuild", help="Drop the index and rebuild it from the archive's files alone "
                          "(no PATH)")] = False,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Exit 1 also when a file was skipped (DICOMDIRs apart)")] = False,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", "-j", min=1, show_default=False,
        help="Worker processes (default: one per CPU)")] = None,
    archive: ArchiveOpt = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = None,
    dicom_json: DicomJsonOpt = False,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Bring existing DICOM files into the archive: one record per file.

    Files are copied in byte for byte through the archive's single insert path, or with
    --in-place indexed where they lie. A re-run skips files already indexed and unchanged.
    A file that is not an instance we can index is skipped, with its reason: not DICOM,
    zero-byte, a raw dataset without preamble, a DICOMDIR, truncated, an unreadable dataset,
    missing or unsafe UIDs.

    Exit 0: every file indexed or skipped. 1: some file failed (I/O error, disk full, a
    path or a file named by a DICOMDIR missing), or with --strict some file was skipped.
    2: bad usage.
    """
    setup_logging(verbose)

    def body() -> int:
        from pacscli.errors import UsageError
        from pacscli.ops.indexer import IndexTally, index_files, rebuild_index
        from pacscli.ops.workers import default_jobs
        from pacscli.records import failed

        quiet_pydicom(verbose)
        settings = get_settings(config, archive, None)
        workers = jobs or default_jobs()
        out = Output(fmt, COLUMNS, dicom_json=dicom_json)
        tally = IndexTally()
        progress, close_bar = progress_bar()
        try:
            if rebuild:
                if paths or in_place:
                    raise UsageError("--rebuild takes no PATH and no --in-place: it reads "
                                     "the archive's own files")
                records = rebuild_index(settings.archive, settings.storage, jobs=workers,
                                        progress=progress)
            else:
                sources: list[str] = []
                for record in input_records(paths):
                    if record.get("path"):
                        sources.append(str(record["path"]))
                    else:
                        missing = failed(UsageError("input record has no path", code="no-path"))
                        tally.add(missing)
                        out.emit(missing)
                if not sources and not tally.statuses:
                    raise UsageError("nothing to index: give PATH..., '-' with paths or records "
                                     "on stdin, or --rebuild")
                records = index_files(settings.archive, settings.storage, sources,
                                      in_place=in_place, jobs=workers, progress=progress)
            for record in records:
                tally.add(record)
                out.emit(record)
        finally:
            close_bar()
            out.close()
        code = tally.exit_code(strict)
        if code != 0 or not quiet:
            typer.echo(f"pacs index: {tally.summary()}", err=True)
        return code

    raise typer.Exit(run(body))
