"""The `pacs` executable: one typer app, one module per command under pacscli/cli/.

Command modules import only typer and light modules at the top; the heavy ones (pydicom,
pynetdicom) load inside the command, so `pacs --help` and completion stay instant.
"""

from __future__ import annotations

import os
import sys

import typer

from pacscli import __version__
from pacscli.cli import echo, find, get, index, move, serve, store, verify

app = typer.Typer(
    name="pacs",
    help="A PACS as a toolkit of composable DICOM commands that speak JSON lines.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pacs {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit"),
) -> None:
    """A PACS as a toolkit of composable DICOM commands that speak JSON lines."""


app.command("echo")(echo.echo)
app.command("find")(find.find)
app.command("move")(move.move)
app.command("get")(get.get)
app.command("index")(index.index)
app.command("serve")(serve.serve)
app.command("verify")(verify.verify)
app.command("store")(store.store)


def _open_standard_streams() -> None:
    """Make a closed stdin, stdout or stderr (`pacs serve >&-`) /dev/null: records and logs
    then go nowhere, rather than into whatever file the command opens next and gets that
    number for (an index, an archived instance), and the command does not crash."""
    for fd, name in ((0, "stdin"), (1, "stdout"), (2, "stderr")):
        try:
            os.fstat(fd)
        except OSError:
            devnull = os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
            if devnull != fd:
                os.dup2(devnull, fd)
                os.close(devnull)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, "r" if fd == 0 else "w", closefd=False,  # noqa: SIM115
                                    encoding="utf-8", errors="backslashreplace"))


def main() -> None:
    """Entry point of the `pacs` executable."""
    _open_standard_streams()
    app()
