"""What every command shares: the common options, settings, error handling, inputs and output.

Only pacscli/cli imports typer, rich and tqdm; the core returns records and raises PacsError.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import queue
import select
import signal
import stat
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, TextIO, cast

import typer

from pacscli.config import Settings, load_settings
from pacscli.errors import ExitCode, PacsError, UsageError
from pacscli.records import Record, read_records, to_json_line

ArchiveOpt = Annotated[
    Path | None,
    typer.Option("--archive", help="Archive folder (env PACS_ARCHIVE; default: per-user data folder)",
                 show_default=False),
]
AetOpt = Annotated[
    str | None,
    typer.Option("--aet", help="Our AE title (env PACS_AET; default PACSCLI)", show_default=False),
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", help="Config file (env PACS_CONFIG; default: per-user config.toml)",
                 show_default=False),
]
FormatOpt = Annotated[
    str | None,
    typer.Option("--format", help="table|jsonl|json|csv (default: table on a terminal, else jsonl)",
                 show_default=False),
]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logging on stderr")]
TlsOpt = Annotated[bool, typer.Option(
    "--tls", help="DICOM over TLS, with the config's [tls] certificate, key and CAs (a remote "
                  "can also say tls = true)")]
DicomJsonOpt = Annotated[bool, typer.Option(
    "--dicom-json", help="Add to each record its PS3.18 DICOM JSON model under `dicom` (a "
                         "file's dataset without its pixel data; a match's own values)")]
QuietOpt = Annotated[bool, typer.Option(
    "--quiet", "-q", help="No summary on stderr when all went well (exit 0): quiet in cron")]


def setup_logging(verbose: int) -> None:
    """Logs go to stderr: warnings by default, -v for ours at INFO, -vv for pynetdicom too."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pacscli").setLevel(level)
    # pynetdicom is chatty at INFO; its errors are ours to report in plain words.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose >= 2 else logging.CRITICAL)
    # pydicom says each oddity of a file twice (warn_and_log): a log record, then a
    # UserWarning of the same words with a line of its own source code. The record will do,
    # but under -v, where all it says is wanted.
    if verbose == 0:
        warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")


def get_settings(config: Path | None, archive: Path | None, aet: str | None) -> Settings:
    """Settings from flags, PACS_* environment and the config file."""
    return load_settings(config_file=config, archive=archive, ae_title=aet)


def fail(message: str, code: int = ExitCode.USAGE) -> NoReturn:
    """Print `pacs: error: message` on stderr and exit."""
    typer.echo(f"pacs: error: {message}", err=True)
    raise typer.Exit(code)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _stop_pynetdicom() -> None:
    """Stop pynetdicom's upper-layer threads. They are not daemons: interrupted while one
    waits on a silent peer (an association request, a release), the process waited for
    its timeout, 30 s or more, before it could exit."""
    dul = sys.modules.get("pynetdicom.dul")
    if dul is None:
        return
    for thread in threading.enumerate():
        if isinstance(thread, dul.DULServiceProvider):
            thread.kill_dul()


def run(body: Callable[[], int], *, read_only: bool = False) -> int:
    """Run a command's body, turning PacsError and Ctrl-C into a message and an exit code.

    No input records on stdin (a `no-input` UsageError) is bad input when nothing was given;
    from a pipe it is an empty result upstream (`find | move` that matched nothing): all of
    nothing done, exit 0.

    When the reader of our output goes away (`| head`), a `read_only` command (find, echo)
    exits 0, its reader having had what it wanted; any other stops with what is left undone,
    so it says so and exits 130 (interrupted), never 0 (all done). SIGTERM (a service
    manager, `timeout`, a CI job cancelled) is taken as Ctrl-C is; a command that handles
    it itself (serve) installs its own handler in `body`."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return body()
    except PacsError as exc:
        if exc.code == "no-input" and _stdin_is_a_pipe():
            logging.getLogger("pacscli").info("%s", exc.message)
            return ExitCode.OK
        fail(exc.message, int(exc.exit_code))
    except KeyboardInterrupt:
        _stop_pynetdicom()
        typer.echo("pacs: interrupted", err=True)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except BrokenPipeError:
        if not read_only:
            with contextlib.suppress(OSError):
                typer.echo("pacs: output closed (broken pipe): stopped before all was done",
                           err=True)
        sys.stderr.close()  # and no second complaint from Python at exit
        raise typer.Exit(ExitCode.OK if read_only else ExitCode.INTERRUPTED) from None
    except Exception as exc:
        # An index SQLite cannot read (damaged on disk, or not a database): a plain message.
        # sqlite3 is looked up, not imported: commands that never load it cannot raise its errors.
        sqlite3 = sys.modules.get("sqlite3")
        if sqlite3 is None or not isinstance(exc, sqlite3.DatabaseError):
            raise
        from pacscli.archive.index import unusable

        error = unusable(exc)
        fail(error.message, int(error.exit_code))


def _stdin_is_a_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(0).st_mode)
    except OSError:
        return False


def input_records(args: list[str] | None, stdin: TextIO | None = None) -> Iterator[Record]:
    """Records from arguments (paths) or stdin (JSON lines or paths).

    stdin is read when `-` is given, or when there are no arguments and stdin is not a
    terminal, so a cron job with paths in its arguments never waits on stdin.
    """
    stdin = stdin or sys.stdin
    args = list(args or [])
    if not args:
        if stdin.isatty():
            return
        yield from read_records(stdin)
        return
    for arg in args:
        if arg == "-":
            yield from read_records(stdin)
        else:
            yield {"path": arg}


class Output:
    """Renders records: a rich table on a terminal, JSON lines otherwise (DESIGN.md section 2).

    Counts failures so the command can pick its exit code.
    """

    FORMATS = ("table", "jsonl", "json", "csv")

    def __init__(self, fmt: str | None, columns: list[str], stream: TextIO | None = None,
                 live: bool = False, dicom_json: bool = False) -> None:
        self.stream = stream or sys.stdout
        if fmt is None:
            fmt = "table" if self.stream.isatty() else "jsonl"
        if fmt not in self.FORMATS:
            raise UsageError(f"unknown --format {fmt!r}: choose one of {', '.join(self.FORMATS)}")
        self.format = fmt
        self.columns = columns
        self.live = live  # a table printed row by row (for long-running commands like serve)
        self.dicom_json = dicom_json  # add each record's DICOM JSON model under `dicom`
        self.rows: list[Record] = []
        self.counts: dict[str, int] = {}
        self._csv: Any = None

    def emit(self, record: Record) -> None:
        """Render one record now (jsonl, csv, live table) or keep it for the end."""
        status = str(record.get("status", "ok"))
        self.counts[status] = self.counts.get(status, 0) + 1
        if status == "failed" and "status" not in self.columns and self.format in ("csv", "table"):
            # columns of DICOM keys only (find's): the failure would read as an empty match;
            # its message is on stderr
            return
        if self.dicom_json and self.format in ("jsonl", "json"):  # no column for it elsewhere
            from pacscli.dicom.json_model import with_dicom_json

            record = with_dicom_json(record)
        if self.format == "jsonl":
            self.stream.write(to_json_line(record) + "\n")
            self.stream.flush()
        elif self.format == "csv":
            if self._csv is None:
                self._csv = csv.DictWriter(self.stream, fieldnames=self.columns,
                                           extrasaction="ignore")
                self._csv.writeheader()
            self._csv.writerow({k: _cell(record.get(k)) for k in self.columns})
            self.stream.flush()
        elif self.format == "table" and self.live:
            from rich.console import Console

            Console(file=self.stream, soft_wrap=True).print(
                "  ".join(_cell(record.get(k)) for k in self.columns), markup=False, highlight=False
            )
        else:
            self.rows.append(record)

    def emit_all(self, records: Iterable[Record]) -> None:
        """Render every record of an iterable."""
        for record in records:
            self.emit(record)

    def close(self) -> None:
        """Print what was kept: the table, or the JSON array."""
        if self.format == "json":
            # one write: json.dump writes piece by piece, slow on an unbuffered stream
            self.stream.write(json.dumps(self.rows, ensure_ascii=False, indent=2, default=str) + "\n")
        elif self.format == "table" and not self.live and self.rows:
            from rich.console import Console
            from rich.table import Table

            table = Table(show_edge=False, pad_edge=False)
            for column in self.columns:
                table.add_column(column, overflow="fold")
            for row in self.rows:
                table.add_row(*(_cell(row.get(c)) for c in self.columns))
            Console(file=self.stream).print(table)
        self.stream.flush()

    @property
    def failed(self) -> int:
        """How many records had status failed."""
        return self.counts.get("failed", 0)

    def exit_code(self) -> int:
        """0 when nothing failed, 1 when some items failed."""
        return ExitCode.PARTIAL if self.failed else ExitCode.OK


_PIPE_CHUNK = 64 * 1024  # Linux's default pipe buffer


class FdStream(io.TextIOBase):
    """Text written straight to a file descriptor, unbuffered: a write blocked on a pipe
    nobody reads holds no lock of Python's (sys.stdout's would stop the exit). `written`
    counts the bytes written, for whoever waits on a writer to know it still moves."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.written = 0

    def write(self, text: str) -> int:
        data = memoryview(text.encode("utf-8", "surrogateescape"))
        while data:
            try:  # a pipe's worth at a time: a slow reader is seen to move (`written`)
                done = os.write(self.fd, data[:_PIPE_CHUNK])
            except BlockingIOError:  # a non-blocking descriptor: wait until it takes more
                select.select([], [self.fd], [])
                continue
            data = data[done:]
            self.written += done
        return len(text)

    def isatty(self) -> bool:
        return os.isatty(self.fd)

    def fileno(self) -> int:
        return self.fd


class BackgroundOutput:
    """Records rendered onto a file descriptor by a thread of their own, for a server whose
    records are a courtesy beside its job (`pacs serve`): `emit` never waits for the reader.

    Up to `backlog` records wait their turn; past that, while the reader reads nothing,
    records are dropped and stderr says how many. A reader that goes away (broken pipe), or
    any other write error, ends the writing, and stderr says why.
    """

    def __init__(self, fmt: str | None, columns: list[str], *, fd: int, dicom_json: bool = False,
                 backlog: int = 10_000) -> None:
        self.stream = FdStream(fd)
        # cast: FdStream has all of TextIO that Output uses
        self.out = Output(fmt, columns, stream=cast(TextIO, self.stream), live=True,
                          dicom_json=dicom_json)
        self.log = logging.getLogger("pacscli.serve")
        self._queue: queue.Queue[Record | None] = queue.Queue(maxsize=backlog)
        self._lock = threading.Lock()
        self._queued = 0  # records taken in
        self._written = 0  # records written (kept, for a JSON array)
        self._dropped = 0  # in all
        self._said = 0  # dropped records stderr has told of
        self._ended = False  # no more writing: the reader went away, or a write failed
        self._thread = threading.Thread(target=self._write, name="records", daemon=True)
        self._thread.start()

    def emit(self, record: Record) -> None:
        """Queue one record; drop it when the queue is full."""
        if self._ended:
            return
        try:
            self._queue.put_nowait(record)
            with self._lock:
                self._queued += 1
        except queue.Full:
            with self._lock:
                self._dropped += 1
                if self._dropped == self._said + 1:
                    self.log.warning("stdout is not being read (%d records wait): records are "
                                     "dropped until it is; receiving and archiving go on",
                                     self._queue.maxsize)

    def close(self, deadline: float, stall: float = 2.0) -> None:
        """Write what waits and end the output (a JSON array's end, say): as long as the
        writing moves on, until `deadline` (time.monotonic()); sooner when nothing was
        written for `stall` s. stderr then says how many records were not written."""
        if not self._ended:
            self._wait_moving(lambda: self._queue.full(), deadline, stall)
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(None)
                self._wait_moving(self._thread.is_alive, deadline, stall)
            if self._thread.is_alive() and not self._ended:
                # a JSON array is written whole at the end
                kept = self._queued if self.out.format == "json" else self._queued - self._written
                if kept:  # else all was written, the end came as time ran out (a stop at 15 s)
                    self.log.warning("stdout is not being read: %d records were not written", kept)
        self._tell_dropped()

    def _wait_moving(self, waiting: Callable[[], bool], deadline: float, stall: float) -> None:
        """Wait while `waiting()` and the writer moves on, until `deadline`."""
        progress, moved = (self._written, self.stream.written), time.monotonic()
        while waiting() and time.monotonic() < min(deadline, moved + stall):
            time.sleep(0.05)
            if (self._written, self.stream.written) != progress:
                progress, moved = (self._written, self.stream.written), time.monotonic()

    def _write(self) -> None:
        try:
            while (record := self._queue.get()) is not None:
                self._tell_dropped()
                self.out.emit(record)
                self._written += 1
            self.out.close()
        except Exception as exc:  # a write error mostly; whatever it is, writing ends here
            self._end(exc)

    def _tell_dropped(self) -> None:
        with self._lock:
            if self._dropped > self._said:
                self.log.warning("%d records were dropped while stdout was not read",
                                 self._dropped - self._said)
                self._said = self._dropped

    def _end(self, exc: Exception) -> None:
        self._ended = True
        devnull = os.open(os.devnull, os.O_WRONLY)  # no later write to the pipe or file
        os.dup2(devnull, self.stream.fd)
        os.close(devnull)
        if isinstance(exc, BrokenPipeError):
            why = "stdout closed (broken pipe)"
        elif isinstance(exc, OSError):
            why = f"cannot write to stdout ({exc.strerror or exc})"
        else:
            why = f"cannot write a record ({type(exc).__name__}: {exc})"
        self.log.warning("%s: records are no longer written; receiving and archiving go on", why)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return str(value.get("message", value))
    if isinstance(value, list):
        return "\\".join(str(v) for v in value)
    return str(value)


def progress_bar(unit: str = "file") -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """A tqdm bar on stderr when it is a terminal: (progress(done, total) callback, close)."""
    if not sys.stderr.isatty():
        return None, lambda: None
    from tqdm import tqdm

    tqdm.monitor_interval = 0  # no monitor thread: commands fork worker processes
    bars: list[Any] = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit=unit, file=sys.stderr, leave=False))
        bar = bars[0]
        if total != bar.total:  # a retrieve learns its total from the peer as it goes
            bar.total = total
            bar.refresh()
        bar.update(done - bar.n)

    def close() -> None:
        for bar in bars:
            bar.close()

    return progress, close


class _QuietPydicom(logging.Filter):
    """Drops pydicom's log records below CRITICAL (its own and its modules' loggers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.CRITICAL or record.name.partition(".")[0] != "pydicom"


def quiet_pydicom(verbose: int) -> None:
    """Silence pydicom's warnings about odd values of dirty files unless -v: the records say
    what matters. Call after setup_logging; pydicom may be imported before or after (`pacs
    store` loads it only for a file it rewrites), as its import resets its logger's level:
    the filter sits on our handlers instead."""
    if not verbose:
        import warnings

        quiet = _QuietPydicom()
        for handler in logging.getLogger().handlers:
            handler.addFilter(quiet)
        warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
