"""Settings: defaults, then the TOML config file, then PACS_* environment, then flags.

The config file (``--config``, else ``PACS_CONFIG``, else the per-user config folder's
``config.toml``) looks like::

    ae_title = "PACSCLI"
    archive = "/srv/pacs"

    [serve]
    port = 11112
    allow = ["CT1", "MR1"]        # calling AE titles let in; empty lets in everyone
    require_called_aet = true
    max_associations = 16
    qr_from_unknown = true        # may AEs not among [remotes] query and retrieve?

    [storage]
    durability = "fsync"          # or "none": faster, but a power cut may lose recent files
    on_conflict = "keep"          # a changed instance with a known SOP Instance UID: keep or replace

    [network]
    max_pdu = 1048576
    connect_timeout = 10

    [tls]                         # DICOM over TLS (PS3.15 B.9, BCP 195)
    cert = "/etc/pacs/pacs.crt"   # our certificate: serve's, and the one peers may ask of us
    key = "/etc/pacs/pacs.key"
    ca = "/etc/pacs/ca.pem"       # the CA that signs peers' certificates (serve needs it)
    verify_peer = true            # check peers' certificates (serve: require one of each client)
    check_hostname = false        # also match the peer's name (always, without ca: system CAs)

    [remotes.ORTHANC]
    ae_title = "ORTHANC"
    host = "10.0.0.5"
    port = 4242
    tls = false                   # true: every association with it over TLS
    permissions = ["find", "move"]  # what it may ask of `pacs serve` (default: all)
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import platformdirs

from pacscli.errors import ConfigError, UsageError

APP_NAME = "pacscli"
DEFAULT_AE_TITLE = "PACSCLI"
DEFAULT_PORT = 11112

QR_PERMISSIONS = frozenset({"find", "move", "get"})

Durability = Literal["fsync", "none"]
ConflictPolicy = Literal["keep", "replace"]


@dataclass(frozen=True)
class Remote:
    """A DICOM peer: AE title, host and port."""

    ae_title: str
    host: str
    port: int
    name: str | None = None
    tls: bool = False  # associations with it go over TLS
    # What this AE may ask of `pacs serve` as a calling AE (Q/R access control).
    permissions: frozenset[str] = frozenset({"find", "move", "get"})

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class NetworkSettings:
    """Timeouts (seconds) and PDU size for every association we make or accept."""

    max_pdu: int = 1024 * 1024
    connect_timeout: float = 10.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0


@dataclass(frozen=True)
class ServeSettings:
    """Settings of `pacs serve`."""

    port: int = DEFAULT_PORT
    bind: str = ""  # all interfaces, as modalities expect of a PACS
    allow: tuple[str, ...] = ()
    require_called_aet: bool = True
    max_associations: int = 16
    # May a calling AE that is not among [remotes] query and retrieve? Remotes have
    # their own `permissions`.
    qr_from_unknown: bool = True
    tls: bool = False  # accept TLS connections only (with [tls] cert and key)


@dataclass(frozen=True)
class TlsSettings:
    """Our side of DICOM over TLS: certificate, key, trusted CAs and how peers are checked.
    Empty paths are unset; an unset `ca` trusts the system's CAs."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    verify_peer: bool = True
    check_hostname: bool = False


@dataclass(frozen=True)
class StorageSettings:
    """How the archive writes: durability and the policy for changed instances."""

    durability: Durability = "fsync"
    on_conflict: ConflictPolicy = "keep"


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to know about where and who we are."""

    archive: Path
    ae_title: str = DEFAULT_AE_TITLE
    config_file: Path | None = None
    remotes: Mapping[str, Remote] = field(default_factory=dict)
    serve: ServeSettings = ServeSettings()
    storage: StorageSettings = StorageSettings()
    network: NetworkSettings = NetworkSettings()
    tls: TlsSettings = TlsSettings()

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    def remote(self, spec: str, *, tls: bool = False) -> Remote:
        """Resolve `AET@HOST:PORT` or a configured remote's name; `tls` asks for TLS with it
        whatever its config says."""
        if spec in self.remotes or "@" in spec:
            remote = self.remotes[spec] if spec in self.remotes else parse_remote(spec)
            return replace(remote, tls=True) if tls else remote
        known = ", ".join(sorted(self.remotes)) or "none configured"
        raise UsageError(
            f"unknown remote {spec!r}: give AET@HOST:PORT or a name from [remotes] "
            f"in the config file (known: {known})"
        )

    def may(self, calling_aet: str, operation: str) -> bool:
        """May `calling_aet` ask `pacs serve` for `operation` (find, move or get)?"""
        remote = self.remote_by_ae_title(calling_aet)
        if remote is None:
            return self.serve.qr_from_unknown
        return operation in remote.permissions

    def remote_by_ae_title(self, ae_title: str) -> Remote | None:
        """The configured remote whose AE title is `ae_title` (C-MOVE destinations)."""
        for remote in self.remotes.values():
            if remote.ae_title == ae_title:
                return remote
        return None


# The AE title runs to the last @ (DICOM allows one in it); the host has none.
_REMOTE_RE = re.compile(r"^(?P<aet>.*)@(?:\[(?P<ip6>[^\]]+)\]|(?P<host>[^:\[\]@]+)):(?P<port>\d+)$")


_AE_TITLE_RULE = "1 to 16 characters of printable ASCII, no backslash"


def validate_ae_title(value: str, what: str = "AE title") -> str:
    """Check an AE title (PS3.5 AE): 1-16 characters of the default repertoire (printable
    ASCII), no backslash; leading and trailing spaces are not significant."""
    stripped = value.strip()
    if not 1 <= len(stripped) <= 16 or "\\" in stripped or \
            any(not " " <= c <= "~" for c in stripped):
        raise UsageError(f"invalid {what} {value!r}: {_AE_TITLE_RULE}")
    return stripped


def parse_remote(spec: str, name: str | None = None) -> Remote:
    """Parse `AET@HOST:PORT` (IPv6 hosts in brackets)."""
    match = _REMOTE_RE.match(spec.strip())
    if not match:
        raise UsageError(f"invalid remote {spec!r}: expected AET@HOST:PORT")
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise UsageError(f"invalid port {port} in remote {spec!r}")
    try:
        aet = validate_ae_title(match["aet"])
    except UsageError:
        raise UsageError(f"invalid remote {spec!r}: its AE title {match['aet']!r} must be "
                         f"{_AE_TITLE_RULE}") from None
    return Remote(ae_title=aet, host=match["ip6"] or match["host"], port=port, name=name)


def default_archive() -> Path:
    """The per-user data folder's archive (XDG on Linux)."""
    return Path(platformdirs.user_data_dir(APP_NAME)) / "archive"


def default_config_file() -> Path:
    """The per-user config folder's config.toml."""
    return Path(platformdirs.user_config_dir(APP_NAME)) / "config.toml"


def _section(data: Mapping[str, Any], name: str) -> dict[str, Any]:
    value = data.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"[{name}] in the config file must be a table")
    return value


# Bounds of numeric settings, by name: (lowest, highest), None for no upper bound. The max
# PDU is bounded both ways (DESIGN.md section 5: never 0, i.e. unlimited); DCMTK refuses
# anything under 4 KiB too.
_RANGES: dict[str, tuple[float, float | None]] = {
    "port": (0, 65535),
    "max_associations": (1, None),
    "max_pdu": (4096, 64 * 1024 * 1024),
    "connect_timeout": (0.001, None),
    "acse_timeout": (0.001, None),
    "dimse_timeout": (0.001, None),
    "network_timeout": (0.001, None),
}


def _ae_titles(value: Any, where: str) -> tuple[str, ...]:
    """A list of AE titles from the config file; a bare string is refused, not split."""
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where} must be a list of AE titles, e.g. [\"CT1\", \"MR1\"], "
                          f"not {value!r}")
    try:
        return tuple(validate_ae_title(item) for item in value)
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc.message}") from exc


def _build(cls: Any, values: dict[str, Any], section: str) -> Any:
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown setting(s) in [{section}]: {', '.join(unknown)}")
    if "allow" in values:
        values = {**values, "allow": _ae_titles(values["allow"], f"[{section}] allow")}
    defaults = cls()
    for name, value in values.items():
        default = getattr(defaults, name)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"[{section}] {name} must be true or false, not {value!r}")
        elif isinstance(default, int | float):
            kind = "a whole number" if isinstance(default, int) else "a number"
            if isinstance(value, bool) or not isinstance(value, type(default) | int):
                raise ConfigError(f"[{section}] {name} must be {kind}, not {value!r}")
            low, high = _RANGES.get(name, (float("-inf"), None))
            if value < low or (high is not None and value > high):
                bounds = f"at least {low:g}" if high is None else f"{low:g} to {high:g}"
                raise ConfigError(f"[{section}] {name} must be {bounds}, not {value!r}")
        elif not isinstance(value, type(default)):
            raise ConfigError(f"[{section}] {name} has the wrong type: {value!r}")
    return cls(**values)


_TOP_LEVEL = frozenset({"ae_title", "archive", "remotes", "serve", "storage", "network", "tls"})
_REMOTE_KEYS = frozenset({"ae_title", "host", "port", "tls", "permissions"})


def _remote(name: str, table: Any) -> Remote:
    """A [remotes.NAME] table, checked."""
    where = f"[remotes.{name}]"
    if not isinstance(table, dict) or not {"ae_title", "host", "port"} <= set(table):
        raise ConfigError(f"{where} needs ae_title, host and port")
    unknown = sorted(set(table) - _REMOTE_KEYS)
    if unknown:
        raise ConfigError(f"unknown setting(s) in {where}: {', '.join(unknown)}")
    for key, kind in (("ae_title", str), ("host", str), ("port", int), ("tls", bool)):
        if key in table and (not isinstance(table[key], kind)
                             or (kind is int and isinstance(table[key], bool))):
            raise ConfigError(f"{where} {key} has the wrong type: {table[key]!r}")
    # Built from its fields, not parsed as AET@HOST:PORT: "A@B" is an AE title DICOM allows.
    try:
        aet = validate_ae_title(table["ae_title"])
    except UsageError as exc:
        raise ConfigError(f"{where}: {exc.message}") from exc
    host, port = table["host"].strip(), table["port"]
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address, bracketed
        host = host[1:-1].strip()
    if not host or any(c in "[]@" or c.isspace() for c in host):
        raise ConfigError(f"{where}: invalid host {table['host']!r}")
    if not 1 <= port <= 65535:
        raise ConfigError(f"{where}: invalid port {port}")
    remote = Remote(ae_title=aet, host=host, port=port, name=name)
    permissions = table.get("permissions", ["find", "move", "get"])
    if not isinstance(permissions, list) or not set(permissions) <= QR_PERMISSIONS:
        raise ConfigError(f"{where} permissions must be a list drawn from {sorted(QR_PERMISSIONS)}")
    return replace(remote, permissions=frozenset(permissions), tls=table.get("tls", False))


def load_settings(
    *,
    config_file: Path | None = None,
    archive: Path | None = None,
    ae_title: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from defaults, the config file, PACS_* environment and explicit values."""
    env = os.environ if env is None else env
    explicit_config = config_file or (Path(env["PACS_CONFIG"]) if env.get("PACS_CONFIG") else None)
    path = explicit_config or default_config_file()
    data: dict[str, Any] = {}
    if path.exists():
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    elif explicit_config is not None:
        raise ConfigError(f"config file {path} does not exist")

    unknown = sorted(set(data) - _TOP_LEVEL)
    if unknown:
        raise ConfigError(f"unknown setting(s) in the config file {path}: {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(_TOP_LEVEL))})")
    for key in ("ae_title", "archive"):
        if key in data and not isinstance(data[key], str):
            raise ConfigError(f"{key} in the config file must be a string, not {data[key]!r}")
    remotes = {name: _remote(name, table) for name, table in _section(data, "remotes").items()}

    file_archive = data.get("archive")
    archive_path = (
        archive
        or (Path(env["PACS_ARCHIVE"]) if env.get("PACS_ARCHIVE") else None)
        or (Path(str(file_archive)).expanduser() if file_archive else None)
        or default_archive()
    )
    # An explicit empty --aet is refused below, not taken for "not given".
    aet = ae_title if ae_title is not None else \
        env.get("PACS_AET") or str(data.get("ae_title", DEFAULT_AE_TITLE))
    storage = _build(StorageSettings, _section(data, "storage"), "storage")
    if storage.durability not in ("fsync", "none"):
        raise ConfigError("[storage] durability must be 'fsync' or 'none'")
    if storage.on_conflict not in ("keep", "replace"):
        raise ConfigError("[storage] on_conflict must be 'keep' or 'replace'")
    return Settings(
        archive=archive_path,
        ae_title=validate_ae_title(aet, "local AE title"),
        config_file=path if path.exists() else None,
        remotes=remotes,
        serve=_build(ServeSettings, _section(data, "serve"), "serve"),
        storage=storage,
        network=_build(NetworkSettings, _section(data, "network"), "network"),
        tls=_build(TlsSettings, _section(data, "tls"), "tls"),
    )
