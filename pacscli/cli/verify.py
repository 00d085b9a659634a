"""`pacs verify`: check the archive and its index agree, file by file; --repair mends them."""

from __future__ import annotations

from typing import Annotated

import typer

from pacscli.cli.common import (
    ArchiveOpt,
    ConfigOpt,
    FormatOpt,
    Output,
    QuietOpt,
    VerboseOpt,
    get_settings,
    progress_bar,
    run,
    setup_logging,
)

COLUMNS = ["status", "problem", "path", "SOPInstanceUID", "repair", "error"]


def verify(
    quick: Annotated[bool, typer.Option(
        "--quick", help="Check sizes only, not checksums and contents")] = False,
    repair: Annotated[bool, typer.Option(
        "--repair", help="Index unindexed files, drop rows of missing files, move corrupt and "
                         "leftover temporary files into .quarantine/ (nothing is deleted)")] = False,
    jobs: Annotated[int | None, typer.Option(
        "--jobs", "-j", min=1, show_default=False,
        help="Worker processes (default: one per CPU)")] = None,
    archive: ArchiveOpt = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = None,
    verbose: VerboseOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Check the archive: every indexed file present, unchanged and readable, every file indexed.

    Each indexed file must exist with its recorded size and sha256, parse whole, and carry
    the UIDs the index says; a file the index does not know, or a temporary file left by a
    process that stopped, is a problem too. One record per problem, then a summary record.
    Safe to run while `pacs serve` receives: files in flight are not problems.

    Exit 0: all is well. 1: something was wrong (even if --repair mended it; run verify
    again to confirm). 2: no archive there.
    """
    setup_logging(verbose)

    def body() -> int:
        from pacscli.ops.verify import exit_code, summary_line, verify_archive
        from pacscli.ops.workers import default_jobs

        settings = get_settings(config, archive, None)
        out = Output(fmt, COLUMNS)
        progress, close_bar = progress_bar("batch")
        summary: dict[str, object] = {}
        try:
            for record in verify_archive(settings.archive, settings.storage, quick=quick,
                                         repair=repair, jobs=jobs or default_jobs(),
                                         progress=progress):
                if record.get("summary"):
                    summary = record
                    if out.format == "table":
                        continue  # the line below says it
                out.emit(record)
        finally:
            close_bar()
            out.close()
        code = exit_code(summary)
        if summary and (code != 0 or not quiet):
            typer.echo(f"pacs verify: {summary_line(summary)}", err=True)
        return code

    raise typer.Exit(run(body))
