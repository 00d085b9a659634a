"""Regenerate completions/ (bash, zsh, fish) and man/pacs.1 from the typer app.

Usage: python scripts/gen_docs.py   (run after changing a command's options; a test checks
that the committed files are current)
"""

from __future__ import annotations

import datetime
import sys
from pathlib import Path
from typing import Any

import typer.main
from typer.completion import get_completion_script  # type: ignore[attr-defined]

from pacscli import __version__
from pacscli.cli.app import app

ROOT = Path(__file__).resolve().parent.parent


def completion_scripts() -> dict[Path, str]:
    """Shell completion scripts, as `pacs --show-completion SHELL` prints them."""
    return {
        ROOT / "completions" / f"pacs.{shell}": get_completion_script(
            prog_name="pacs", complete_var="_PACS_COMPLETE", shell=shell)
        for shell in ("bash", "zsh", "fish")
    }


def _roff(text: str) -> str:
    return text.replace("\\", "\\\\").replace("-", "\\-").replace("\n.", "\n\\&.")


def man_page() -> str:
    """man/pacs.1: every command with its help and options."""
    group: Any = typer.main.get_command(app)  # typer vendors click: use it by duck typing
    ctx = group.make_context("pacs", [], resilient_parsing=True)
    lines = [
        f'.TH PACS 1 "{datetime.date(2026, 1, 1):%Y}" "pacscli {__version__}" "User Commands"',
        ".SH NAME",
        "pacs \\- a PACS as a toolkit of composable DICOM commands that speak JSON lines",
        ".SH SYNOPSIS",
        ".B pacs",
        "\\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        _roff(group.help or ""),
        ".PP",
        "When stdout is not a terminal every command writes JSON lines, one record per line.",
        "Exit codes: 0 all done; 1 some items failed; 2 usage or bad input; 3 could not",
        "connect or association rejected; 4 the peer answered with a failure status;",
        "130 interrupted.",
        ".SH COMMANDS",
    ]
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None:
            continue
        sub = command.make_context(name, [], parent=ctx, resilient_parsing=True)
        lines += [".SS " + _roff(" ".join(["pacs", *command.collect_usage_pieces(sub)]).replace(
            "pacs ", f"pacs {name} ", 1)), _roff(command.help or "")]
        for param in command.get_params(sub):
            record = param.get_help_record(sub)
            if record:
                lines += [".TP", f"\\fB{_roff(record[0])}\\fR", _roff(record[1])]
    lines += [".SH FILES", "~/.config/pacscli/config.toml, ~/.local/share/pacscli/archive",
              ".SH ENVIRONMENT", "PACS_ARCHIVE, PACS_CONFIG, PACS_AET"]
    return "\n".join(lines) + "\n"


def generated() -> dict[Path, str]:
    """Every generated file and its content."""
    return {**completion_scripts(), ROOT / "man" / "pacs.1": man_page()}


def main() -> int:
    for path, text in generated().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
