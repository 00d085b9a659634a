"""`pacs find`: C-FIND a remote, or run the same query on the local archive's index."""

from __future__ import annotations

import time
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
    run,
    setup_logging,
)

# On a terminal, a table of what tells matches apart; the records carry every key.
TABLE_COLUMNS = {
    "PATIENT": ["PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                "NumberOfPatientRelatedStudies"],
    "STUDY": ["PatientName", "PatientID", "StudyDate", "ModalitiesInStudy", "StudyDescription",
              "AccessionNumber", "NumberOfStudyRelatedInstances", "StudyInstanceUID"],
    "SERIES": ["SeriesNumber", "Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances",
               "SeriesInstanceUID"],
    "IMAGE": ["InstanceNumber", "SOPClassUID", "SOPInstanceUID"],
}

LevelOpt = Annotated[str, typer.Option("--level", "-l", help="patient|study|series|image")]
ModelOpt = Annotated[str, typer.Option(
    "--model", "-m", help="Information model: study (Study Root) or patient (Patient Root)")]


def find(
    remote: Annotated[str | None, typer.Argument(
        metavar="[REMOTE]", show_default=False,
        help="AET@HOST:PORT or a remote's name from the config; none queries the archive")] = None,
    level: LevelOpt = "study",
    keys: Annotated[list[str] | None, typer.Option(
        "--key", "-k", metavar="KEY=VALUE", show_default=False,
        help="A matching key (keyword or (gggg,eeee); wildcards * ?, ranges A-B, UID lists "
             "A\\B); KEY or KEY= asks for a return key. Repeatable")] = None,
    model: ModelOpt = "study",
    limit: Annotated[int | None, typer.Option("--limit", "-n", min=1, show_default=False,
                                              help="Stop after N matches")] = None,
    ci_names: Annotated[bool, typer.Option(
        "--ci-names", "--case-insensitive-names",
        help="Match person names regardless of case (asks a remote for fuzzy matching)")] = False,
    no_defaults: Annotated[bool, typer.Option(
        "--no-defaults", help="Return only the -k keys and the unique keys, not the level's "
                              "default return keys")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                        help="No count and timing on stderr")] = False,
    archive: ArchiveOpt = None,
    aet: AetOpt = None,
    config: ConfigOpt = None,
    fmt: FormatOpt = None,
    tls: TlsOpt = False,
    dicom_json: DicomJsonOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    """Query a remote (C-FIND) or the archive's index: one record per match.

    Records carry DICOM keywords and their QueryRetrieveLevel, ready for `pacs move` or
    `pacs get`. Without REMOTE the archive (--archive, PACS_ARCHIVE or the per-user one) is
    queried, with the same matching and the same records.

    Exit 0: query done (even with no match); 2: bad query; 3: cannot connect; 4: the remote
    answered with a failure status.
    """
    setup_logging(verbose)

    def body() -> int:
        from pacscli.dicom.query import DEFAULT_KEYS, build_query
        from pacscli.errors import UsageError

        settings = get_settings(config, archive, aet)
        if remote is not None and archive is not None:
            raise UsageError("give REMOTE or --archive, not both")
        query = build_query(level, keys or [], model=model, defaults=not no_defaults)
        out = Output(fmt, list(query.order), dicom_json=dicom_json)
        if out.format == "table":
            shown = [] if no_defaults else TABLE_COLUMNS[query.level]
            defaults = () if no_defaults else DEFAULT_KEYS[query.model][query.level]
            out.columns = shown + [k for k in query.order if k not in shown
                                   and k not in defaults and k != "QueryRetrieveLevel"]
        started = time.perf_counter()
        count = 0
        where: str
        try:
            if remote is not None:
                from pacscli.net.find import find as c_find

                target = settings.remote(remote, tls=tls)
                where = str(target)
                records = c_find(settings, target, query, limit=limit,
                                 case_insensitive_names=ci_names)
            else:
                from pacscli.archive.query import find_records, open_index

                index = open_index(settings.archive)
                where = f"archive {settings.archive}"
                records = find_records(index, query, case_insensitive_names=ci_names, limit=limit)
            for record in records:
                if record.get("status") != "failed":
                    count += 1
                out.emit(record)
        finally:
            out.close()
        if not quiet:
            elapsed = (time.perf_counter() - started) * 1000
            typer.echo(f"pacs find: {count} {query.level.lower()} match"
                       f"{'' if count == 1 else 'es'} in {elapsed:.1f} ms ({where})", err=True)
        return 0

    raise typer.Exit(run(body, read_only=True))
