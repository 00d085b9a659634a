"""The config file: what it accepts, and the plain errors for what it does not."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pacscli.config import Settings, load_settings
from pacscli.errors import ConfigError, UsageError
from tests.conftest import pacs_cmd


def load(tmp_path: Path, text: str) -> Settings:
    config = tmp_path / "config.toml"
    config.write_text(text)
    return load_settings(config_file=config, env={})


REMOTE = '[remotes.A]\nae_title = "ORTHANC"\nhost = "127.0.0.1"\nport = 4242\n'


def test_a_full_config_loads(tmp_path: Path) -> None:
    settings = load(tmp_path, 'ae_title = "ME"\narchive = "/srv/pacs"\n'
                              '[serve]\nallow = ["CT1", "MR1"]\nmax_associations = 4\n'
                              '[network]\nmax_pdu = 65536\nconnect_timeout = 2.5\n'
                              + REMOTE + 'permissions = ["find"]\n')
    assert settings.ae_title == "ME" and settings.archive == Path("/srv/pacs")
    assert settings.serve.allow == ("CT1", "MR1") and settings.serve.max_associations == 4
    assert settings.network.max_pdu == 65536 and settings.network.connect_timeout == 2.5
    assert str(settings.remote("A")) == "ORTHANC@127.0.0.1:4242"
    assert settings.remote("A").permissions == frozenset({"find"})


@pytest.mark.parametrize(("text", "says"), [
    # a bare string used to be split into one-letter AE titles: CT1 out, "C" let in
    ('[serve]\nallow = "CT1"\n', "must be a list of AE titles"),
    ('[serve]\nallow = [1]\n', "must be a list of AE titles"),  # was an AttributeError
    ('[serve]\nallow = ["a\\\\b"]\n', "invalid AE title"),
    ('[network]\nmax_pdu = 1.5\n', "max_pdu must be a whole number"),  # was a TypeError
    ('[network]\nmax_pdu = 0\n', "max_pdu must be 4096 to"),
    ('[network]\nmax_pdu = -5\n', "max_pdu must be 4096 to"),
    ('[network]\nconnect_timeout = 0\n', "connect_timeout must be at least"),
    ('[network]\nconnect_timeout = "5"\n', "connect_timeout must be a number"),
    ('[serve]\nmax_associations = 0\n', "max_associations must be at least 1"),
    ('[serve]\nrequire_called_aet = 1\n', "must be true or false"),
    ('aetitle = "ME"\n', "unknown setting(s) in the config file"),
    ('ae_title = 5\n', "ae_title in the config file must be a string"),
    ('archive = 5\n', "archive in the config file must be a string"),
    (REMOTE + 'tls = "yes"\n', "tls has the wrong type"),
    ('[tls]\nverify_peer = "no"\n', "[tls] verify_peer must be true or false"),
    ('[tls]\ncertificate = "x.pem"\n', "unknown setting(s) in [tls]: certificate"),
    (REMOTE + 'tsl = false\n', "unknown setting(s) in [remotes.A]: tsl"),
    ('[remotes.A]\nae_title = ["X"]\nhost = "h"\nport = 1\n', "ae_title has the wrong type"),
    ('[remotes.A]\nae_title = "X"\nhost = "h"\nport = "104"\n', "port has the wrong type"),
    ('[remotes.A]\nae_title = "X"\nhost = "h"\nport = 70000\n', "invalid port"),
])
def test_a_wrong_setting_is_a_config_error(tmp_path: Path, text: str, says: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, text)
    assert says in raised.value.message


def test_tls_settings(tmp_path: Path) -> None:
    settings = load(tmp_path, REMOTE + 'tls = true\n[tls]\ncert = "~/c.pem"\nverify_peer = false\n')
    assert settings.remotes["A"].tls and settings.tls.cert == "~/c.pem"
    assert not settings.tls.verify_peer and not settings.tls.check_hostname
    assert settings.remote("X@h:104", tls=True).tls and not settings.remote("X@h:104").tls


def test_a_tls_file_that_cannot_be_loaded_is_a_config_error(tmp_path: Path) -> None:
    """Not a traceback, nor an association in the clear."""
    config = tmp_path / "config.toml"
    config.write_text(REMOTE + f'tls = true\n[tls]\nca = "{tmp_path / "none.pem"}"\n')
    result = subprocess.run(pacs_cmd("echo", "A"), capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL, env={**os.environ, "PACS_CONFIG": str(config)})
    assert result.returncode == 2
    assert "cannot load the CA certificates of [tls] ca" in result.stderr
    assert "No such file or directory" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


@pytest.mark.parametrize(("spec", "says"), [
    ("PACS@127.0.0.1:104", None),
    ("PACS@[::1]:104", None),
    ("TOOLONGAETITLE12345@h:104", "its AE title 'TOOLONGAETITLE12345' must be 1 to 16 characters"),
    ("@h:104", "its AE title '' must be 1 to 16 characters"),
    ("A\\B@h:104", "no backslash"),
    ("PACS@h:99999", "invalid port 99999"),
    ("PACS@h", "expected AET@HOST:PORT"),
    ("PACSh:104", "unknown remote 'PACSh:104'"),  # taken for a name from the config
    ("P\u00c4CS@h:104", "must be 1 to 16 characters of printable ASCII"),  # was a traceback
    ("A\tB@h:104", "must be 1 to 16 characters of printable ASCII"),
])
def test_a_remote_spec_says_what_is_wrong(tmp_path: Path, spec: str, says: str | None) -> None:
    settings = load(tmp_path, "")
    if says is None:
        assert str(settings.remote(spec)) == spec
        return
    with pytest.raises(UsageError) as raised:
        settings.remote(spec)
    assert says in raised.value.message


def test_a_remote_table_takes_its_ae_title_as_written(tmp_path: Path) -> None:
    """An AE title with an @ is DICOM's to allow: it used to be split into the AE title
    before it and a host "B@127.0.0.1"; one outside printable ASCII is refused."""
    settings = load(tmp_path, '[remotes.A]\nae_title = "A@B"\nhost = "127.0.0.1"\nport = 104\n'
                              '[remotes.V6]\nae_title = "V6"\nhost = "::1"\nport = 104\n'
                              '[remotes.B6]\nae_title = "B6"\nhost = "[::1]"\nport = 104\n')
    remote = settings.remote("A")
    assert (remote.ae_title, remote.host, remote.port) == ("A@B", "127.0.0.1", 104)
    again = settings.remote(str(remote))  # the form it prints, as a command line gives it
    assert (again.ae_title, again.host, again.port) == ("A@B", "127.0.0.1", 104)
    assert str(settings.remote("V6")) == "V6@[::1]:104"
    assert settings.remote("B6").host == "::1"
    for host in ("[]", "[ ]", "[::1]:104", "127.0.0.1]", "a host", "a@b"):
        with pytest.raises(ConfigError) as raised:
            load(tmp_path, f'[remotes.A]\nae_title = "A"\nhost = "{host}"\nport = 104\n')
        assert f"[remotes.A]: invalid host {host!r}" in raised.value.message
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, '[remotes.A]\nae_title = "\u00c9CHO"\nhost = "h"\nport = 104\n')
    assert "[remotes.A]: invalid AE title '\u00c9CHO'" in raised.value.message
