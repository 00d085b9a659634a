"""The `pacs` executable: one typer app, one module per command under pacscli/cli/.

Command modules import only typer and light modules at the top; the heavy ones (pydicom,
pynetdicom) load inside the command, so `pacs --help` and completion stay instant.
"""

from __future__ import annotations

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


def main() -> None:
    """Entry point of the `pacs` executable."""
    app()
