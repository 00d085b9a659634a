"""The architecture's rules that a test can check (DESIGN.md section 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CORE_MODULES = [
    "pacscli.config", "pacscli.records", "pacscli.errors", "pacscli.archive.archive",
    "pacscli.archive.index", "pacscli.dicom.identity", "pacscli.net.scp", "pacscli.net.server",
    "pacscli.net.ae",
]
ROOT = Path(__file__).resolve().parent.parent


def loaded_after(code: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", f"{code}\nimport sys\nprint(' '.join(sys.modules))"],
                            capture_output=True, text=True, check=True, cwd=ROOT)
    return set(result.stdout.split())


def test_the_core_never_loads_the_cli_libraries() -> None:
    modules = loaded_after("\n".join(f"import {m}" for m in CORE_MODULES + _optional_core()))
    # tqdm is left out: pydicom itself imports it.
    assert not {"typer", "rich"} & modules


def test_only_the_cli_imports_typer_rich_or_tqdm() -> None:
    offenders = []
    for module in _optional_core():
        source = (ROOT / Path(*module.split("."))).with_suffix(".py").read_text()
        for line in source.splitlines():
            words = line.strip().split()
            if words[:1] in (["import"], ["from"]) and words[1].split(".")[0] in {"typer", "rich", "tqdm"}:
                offenders.append(f"{module}: {line.strip()}")
    assert not offenders


def _optional_core() -> list[str]:
    """Every other core module present in the package (all but pacscli/cli)."""
    names = []
    for path in sorted((ROOT / "pacscli").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        if rel.parts[1] in {"cli", "__main__"} or rel.name == "__init__":
            continue
        names.append(".".join(rel.parts))
    return names


def test_help_loads_no_dicom_library() -> None:
    """`pacs --help` and completion stay instant: commands import pydicom lazily."""
    modules = loaded_after("from pacscli.cli.app import app")
    assert not {"pydicom", "pynetdicom", "numpy"} & modules


def test_the_store_path_loads_no_dicom_library() -> None:
    """`pacs store` loads pydicom only to rewrite a file, and pynetdicom never: the modules on
    its path (and the acceptor's framing it shares) import neither."""
    modules = loaded_after("import pacscli.net.store, pacscli.net.client, pacscli.net.server, "
                           "pacscli.net.pdu, pacscli.dicom.identity, pacscli.cli.store")
    assert not {"pydicom", "pynetdicom", "numpy", "tqdm", "rich"} & modules


def test_generated_docs_are_current() -> None:
    """completions/ and man/ match the commands (regenerate: python scripts/gen_docs.py)."""
    sys.path.insert(0, str(ROOT))
    from scripts.gen_docs import generated

    stale = [str(p.relative_to(ROOT)) for p, text in generated().items()
             if not p.exists() or p.read_text() != text]
    assert not stale, f"run python scripts/gen_docs.py: stale {stale}"
