"""`pacs store`: C-STORE files, folders or stdin records to a remote."""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Callable
from typing import Annotated, Any

import typer

from pacscli.cli.common import (
    AetOpt,
    ConfigOpt,
    FormatOpt,
    Output,
    VerboseOpt,
    get_settings,
    input_records,
    run,
    setup_logging,
)

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
    aet: AetOpt = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """C-STORE DICOM files to a remote: one result record per file.

    Files go out as stored if the peer takes their syntax, else decompressed (Explicit VR LE).
    Non-DICOM files are skipped.

    Exit 0: all sent; 1: some failed; 2: no input; 3: could not associate.
    """
    setup_logging(verbose)

    def body() -> int:
        from pacscli.net.store import store as send

        if not verbose:
            # pydicom warns about each odd value of dirty files; the records say what was
            # fixed. Set after its import, which sets its own logger's level.
            logging.getLogger("pydicom").setLevel(logging.CRITICAL)
            warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")

        settings = get_settings(config, None, aet)
        target = settings.remote(remote)
        out = Output(fmt, COLUMNS)
        if out.format == "table":
            out.columns = TABLE_COLUMNS
        progress, close_bar = _progress_bar()
        try:
            out.emit_all(send(settings, target, input_records(paths), jobs=jobs,
                              progress=progress))
        finally:
            close_bar()
            out.close()
        return out.exit_code()

    raise typer.Exit(run(body))


def _progress_bar() -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A tqdm bar on stderr when it is a terminal: (progress callback, close)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    bars: list[Any] = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="file", file=sys.stderr, leave=False))
        bars[0].update(done - bars[0].n)

    def close() -> None:
        for bar in bars:
            bar.close()

    return progress, close
