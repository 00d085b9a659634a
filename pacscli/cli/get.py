"""`pacs get`: C-GET studies, series or instances from a remote into the archive or a folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

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
    progress_bar,
    run,
    setup_logging,
)
from pacscli.cli.move import (
    InstanceOpt,
    LevelOpt,
    ModelOpt,
    PatientOpt,
    SeriesOpt,
    StdinArg,
    StudyOpt,
    requests,
)

COLUMNS = ["status", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
           "SOPClassUID", "TransferSyntaxUID", "path", "outcome", "remote", "QueryRetrieveLevel",
           "dimse_status", "completed", "failed", "warning", "error"]
TABLE_COLUMNS = ["status", "SOPInstanceUID", "path", "outcome", "error"]


def get(
    remote: Annotated[str, typer.Argument(metavar="REMOTE", show_default=False,
                                          help="AET@HOST:PORT or a remote's name from the config")],
    stdin: StdinArg = None,
    out_dir: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Write the files under DIR/STUDY/SERIES/SOP.dcm instead of into the archive")] = None,
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
    dicom_json: DicomJsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """C-GET from a remote into the archive (indexed) or --out DIR, for stdin records (their
    QueryRetrieveLevel and UIDs, e.g. from `pacs find`) or --study/--series/--instance UIDs.

    One record per instance received; a request that did not fully succeed adds a record
    with the remote's completed, failed and warning counts.

    Exit 0: all retrieved; 1: some failed; 2: bad input; 3: cannot connect; 4: the remote
    refused every request.
    """
    setup_logging(verbose)

    def body() -> int:
        from pacscli.errors import UsageError
        from pacscli.net.get import get as c_get

        settings = get_settings(config, archive, aet)
        if out_dir is not None and archive is not None:
            raise UsageError("give --archive or --out, not both")
        target = settings.remote(remote, tls=tls)
        inputs = requests(patient, study, series, instance, level, model, stdin)
        out = Output(fmt, COLUMNS, dicom_json=dicom_json)
        if out.format == "table":
            out.columns = TABLE_COLUMNS
        store = None
        progress, close_bar = progress_bar("instance")
        try:
            if out_dir is None:
                from pacscli.archive.archive import Archive

                store = Archive(settings.archive, settings.storage)
            out.emit_all(c_get(settings, target, inputs, model=model, archive=store,
                               out=out_dir, progress=progress))
        finally:
            close_bar()
            out.close()
            if store is not None:
                store.close()
        return out.exit_code()

    raise typer.Exit(run(body))
