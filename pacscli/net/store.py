"""C-STORE SCU: send files, folders and records to a peer, one result record per instance.

A file goes out as its bytes on disk whenever the peer accepts its transfer syntax: the
association streams the dataset from the file, nothing is decoded. A file is decoded and
rewritten to a temporary file only to repair it (padded or disagreeing UIDs, odd-length
fragments) or to convert it to an uncompressed syntax the peer accepts.

Only that rewrite, and files the element walker does not cover (big endian, deflated,
unusual headers), load pydicom: sending clean files loads neither pydicom nor pynetdicom,
whose imports took ~0.3 s of the ~0.75 s `pacs store` spent starting up.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import stat
import tempfile
import threading
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pacscli.config import Remote, Settings
from pacscli.dicom.attributes import tag_of
from pacscli.dicom.identity import read_header, read_meta_values, read_raw_header, read_raw_top_level
from pacscli.dicom.scan import mapped, scan_part10
from pacscli.dicom.uids import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MEDIA_STORAGE_DIRECTORY,
    UNCOMPRESSED_SYNTAXES,
    clean_uid,
    is_encapsulated,
    require_sop_class,
    uid_name,
)
from pacscli.errors import InvalidDicomError, NetworkError, PacsError, UsageError
from pacscli.inputs import not_a_file, walk
from pacscli.net.client import ClientAssociation, SendStalled, request_association
from pacscli.net.pdu import PresentationContext
from pacscli.net.server import AssociationClosed, Context, DatasetFile, ProtocolBroken
from pacscli.records import Record, failed, skipped

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128  # pynetdicom's limit per association (PS3.8 allows 128 odd context IDs)
# C-STORE warnings (PS3.7 C.4 and 9.1.1.1): the instance was stored.
WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})
IDENTITY = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
_IDENTITY_TAGS = tuple(tag_of(kw) for kw in IDENTITY)
# What a failed record keeps of an input record without a path, to say which one it was.
_RECORD_KEYS = ("QueryRetrieveLevel", "PatientID", *IDENTITY)
_IDENTITY_TAG_SET = frozenset(_IDENTITY_TAGS)

Progress = Callable[[int, int], None]  # (instances done, instances to send)


class NotDicomError(InvalidDicomError):
    """The file is not a DICOM Part 10 file: skipped, not a failure."""

    code = "not-dicom"


@dataclass(frozen=True)
class Instance:
    """A file to send: its identity as the peer will see it, and what must be repaired."""

    path: Path
    sop_class: str
    sop_uid: str
    transfer_syntax: str
    dataset_offset: int = 0  # where the dataset starts in the file, after the file meta
    fixes: tuple[str, ...] = ()  # UID repairs, made on the decoded dataset
    odd_fragments: bool = False  # encapsulated fragments of odd length
    odd_length: bool = False  # a dataset of odd length (deflated ones often are)

    @property
    def needs_rewrite(self) -> bool:
        """True when the file cannot go out as its bytes on disk even if its syntax is accepted."""
        return bool(self.fixes) or self.odd_fragments or self.odd_length

    def record(self, remote: Remote) -> Record:
        """The fields every record about this instance starts with."""
        return {"path": str(self.path), "SOPInstanceUID": self.sop_uid,
                "SOPClassUID": self.sop_class, "TransferSyntaxUID": self.transfer_syntax,
                "remote": str(remote)}


def _uid_text(elem: Any) -> str | None:
    """A UID element's value as stored (raw bytes when not yet decoded), None when absent."""
    if elem is None:
        return None
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("latin-1")
    return None if value is None else str(value)


def _meta_text(meta: dict[int, bytes], keyword: str) -> str | None:
    """A file meta element's value as stored, None when absent."""
    raw = meta.get(tag_of(keyword))
    return None if raw is None else raw.decode("latin-1")


def _is_padded(text: str) -> bool:
    """True for padding other than the single trailing NUL that makes a UID even-length."""
    return text not in (clean_uid(text), clean_uid(text) + "\x00")


def _has_odd_fragment(fp: BinaryIO) -> bool:
    """True when the encapsulated Pixel Data at fp's position has an odd-length item.

    Reads item headers only, seeking over the fragments.
    """
    header = fp.read(12)
    if header[:4] != b"\xe0\x7f\x10\x00" or header[8:12] != b"\xff\xff\xff\xff":
        return False
    while len(item := fp.read(8)) == 8 and item[:4] == b"\xfe\xff\x00\xe0":
        length = int.from_bytes(item[4:], "little")
        if length % 2:
            return True
        fp.seek(length, 1)
    return False


def _implicit_at(fp: BinaryIO, offset: int) -> bool:
    """Whether the dataset at `offset` begins as implicit VR does: no VR letters after its
    first tag (what pydicom and scan_part10 go by in a file labelled explicit)."""
    fp.seek(offset)
    head = fp.read(6)
    fp.seek(offset)
    return len(head) == 6 and not (b"AA" <= head[4:6] <= b"ZZ")


def _identity_texts(fp: BinaryIO, offset: int,
                    transfer_syntax: str) -> tuple[list[str | None], bool]:
    """The IDENTITY UIDs as stored in the dataset at `offset` (None when absent), and
    whether its encapsulated pixel data has an odd-length fragment.

    The element walker reads the common case without pydicom (pydicom's header parse was
    most of a scan, and loading pydicom most of a short run's start-up); for encapsulated
    pixel data it also says where the header ends, and the fragments are read from there.
    Anything the walker does not cover takes pydicom's reader.
    """
    encapsulated = is_encapsulated(transfer_syntax)
    if not encapsulated:
        raw = read_raw_top_level(fp, transfer_syntax, _IDENTITY_TAG_SET)
        if raw is not None:
            return [None if (value := raw.get(tag)) is None else value.decode("latin-1")
                    for tag in _IDENTITY_TAGS], False
    else:
        header = read_raw_header(fp, transfer_syntax, _IDENTITY_TAG_SET)
        if header is not None:
            raw, length = header
            fp.seek(offset + length)
            return [None if (value := raw.get(tag)) is None else value.decode("latin-1")
                    for tag in _IDENTITY_TAGS], _has_odd_fragment(fp)
    fp.seek(offset)
    # Reads on from the file meta (no second parse), stopping at the Pixel Data element
    # with fp left there (not so when deflated).
    ds = read_header(fp, transfer_syntax, part10=True)
    texts = [_uid_text(ds.get_item(keyword)) for keyword in IDENTITY]
    return texts, encapsulated and _has_odd_fragment(fp)


def _refuse_truncated(fp: BinaryIO) -> None:
    """Raise for a file cut short: pydicom reads one without complaint, and the peer would
    archive it as whole. Other oddities of structure are the peer's to judge."""
    with mapped(fp) as data:
        try:
            scan_part10(data)
        except InvalidDicomError as exc:
            if exc.code == "truncated":
                raise


def scan(path: Path) -> Instance:
    """Read what sending `path` needs from its file meta and dataset header (no pixel data).

    Raises NotDicomError for a file that is not Part 10, InvalidDicomError when it is unusable.
    """
    try:
        with open(path, "rb") as fp:
            # First, so that a file cut short is named so, as `pacs index` names it, rather
            # than by what its cut removed (a Transfer Syntax UID, a VR's second letter).
            _refuse_truncated(fp)
            try:
                meta, offset = read_meta_values(fp)
            except InvalidDicomError as exc:
                raise NotDicomError(exc.message, code=exc.code) from exc
            odd_length = (os.fstat(fp.fileno()).st_size - offset) % 2 == 1
            ts_text = _meta_text(meta, "TransferSyntaxUID") or ""
            transfer_syntax = clean_uid(ts_text)
            if not transfer_syntax:
                raise InvalidDicomError("the file meta has no Transfer Syntax UID")
            mislabelled = transfer_syntax == EXPLICIT_VR_LITTLE_ENDIAN and _implicit_at(fp, offset)
            if mislabelled:  # sent as encoded: a peer reading it as the meta says cannot
                transfer_syntax = IMPLICIT_VR_LITTLE_ENDIAN
            uid_texts, odd = _identity_texts(fp, offset, transfer_syntax)
    except OSError as exc:  # named as `pacs index` names it
        raise InvalidDicomError(f"cannot read {path}: {exc.strerror or exc}",
                                code="unreadable") from exc
    except InvalidDicomError:
        raise
    except Exception as exc:  # pydicom raises many kinds on damaged files
        raise InvalidDicomError(f"unreadable DICOM dataset: {exc}") from exc

    fixes: list[str] = []
    if _is_padded(ts_text):
        fixes.append("TransferSyntaxUID padding removed")
    if mislabelled:
        fixes.append("the file meta says Explicit VR Little Endian, the dataset is Implicit VR "
                     "Little Endian: sent as Implicit VR Little Endian")
    values: dict[str, str] = {}
    for keyword, text in zip(IDENTITY, uid_texts, strict=True):
        if text is not None and clean_uid(text):
            values[keyword] = clean_uid(text)
            if _is_padded(text):
                fixes.append(f"{keyword} padding removed")
    # The dataset's UIDs name the instance; the file meta only fills in what it lacks.
    for keyword, meta_keyword in (("SOPClassUID", "MediaStorageSOPClassUID"),
                                  ("SOPInstanceUID", "MediaStorageSOPInstanceUID")):
        text = _meta_text(meta, meta_keyword)
        meta_uid = clean_uid(text)
        if keyword not in values:
            if not meta_uid:
                raise InvalidDicomError(f"the instance has no {keyword}")
            values[keyword] = meta_uid
            fixes.append(f"{keyword} taken from the file meta")
        elif not meta_uid:
            fixes.append(f"file meta lacked {meta_keyword}")
        elif meta_uid != values[keyword]:
            fixes.append(f"file meta {meta_keyword} {meta_uid} differs from the dataset's: "
                         "sent the dataset's")
        elif text is not None and _is_padded(text):
            fixes.append(f"{meta_keyword} padding removed")
    if len(values["SOPInstanceUID"]) > 64:  # a command set peers cannot parse: they abort
        raise InvalidDicomError(f"SOPInstanceUID is {len(values['SOPInstanceUID'])} characters "
                                f"long (at most 64): {values['SOPInstanceUID']!r}")
    return Instance(path, require_sop_class(values["SOPClassUID"]), values["SOPInstanceUID"],
                    transfer_syntax, offset, tuple(fixes), odd, odd_length)


def _files(path: Path) -> Iterator[Path | Record]:
    """A file, or the files under a folder (recursive, in a repeatable order) and the
    records of what in it will not be read."""
    if not path.is_dir():
        yield path
        return
    for files in walk(str(path)):
        if isinstance(files, list):
            yield from map(Path, files)
        else:
            yield files


# Finds the archived files of a record without a path, by its UIDs (`pacs store --archive`):
# raises PacsError when it cannot.
Resolver = Callable[[Record], list[Path]]


def collect(records: Iterable[Record], resolve: Resolver | None = None,
            first: int = 1) -> Iterator[Instance | Record]:
    """Instances to send from input records (`path` of a file or folder; without one, the
    files `resolve` finds for the record's UIDs), or records for inputs that will not be
    sent: skipped (not DICOM) or failed (missing, unreadable, not in the archive). `first`
    is the first record's number, for messages."""
    for number, record in enumerate(records, start=first):
        raw_path = record.get("path")
        if not raw_path:
            identity = {k: v for k, v in record.items() if k in _RECORD_KEYS}
            if resolve is None:
                yield failed(UsageError(f"input record {number} has no path", code="no-path"),
                             input=number, **identity)
                continue
            try:
                files = resolve(record)
            except PacsError as exc:
                yield failed(PacsError(f"input record {number} has no path, and {exc.message}",
                                       code=exc.code), input=number, **identity)
                continue
            yield from _instances(files)
            continue
        path = Path(str(raw_path))
        try:
            os.stat(path)
        except FileNotFoundError:
            yield failed(InvalidDicomError(f"{path}: no such file or folder", code="not-found"),
                         path=str(path))
            continue
        except OSError as exc:  # a name too long, a folder on the way we may not enter...
            yield failed(InvalidDicomError(f"{path}: {exc.strerror or exc}", code="unreadable"),
                         path=str(path))
            continue
        except ValueError:
            yield failed(InvalidDicomError(f"{str(path)!r}: not a usable path (it holds a NUL "
                                           "character)", code="bad-path"), path=str(path))
            continue
        yield from _instances(_files(path))


def _instances(files: Iterable[Path | Record]) -> Iterator[Instance | Record]:
    """Each file as an Instance to send, or as the record of why it will not be sent
    (records among `files` pass through)."""
    for file in files:
        if not isinstance(file, Path):
            yield file
            continue
        try:
            mode = file.stat().st_mode
        except FileNotFoundError:
            if file.is_symlink():
                yield not_a_file(str(file))
            else:  # an archived file gone missing
                yield failed(InvalidDicomError(f"{file}: no such file", code="not-found"),
                             path=str(file))
            continue
        if not stat.S_ISREG(mode):  # never opened: reading a FIFO would wait forever
            yield not_a_file(str(file))
            continue
        try:
            instance = scan(file)
        except NotDicomError as exc:
            yield skipped(str(file), exc.code, exc.message)
            continue
        except InvalidDicomError as exc:
            yield failed(exc, path=str(file))
            continue
        if instance.sop_class == MEDIA_STORAGE_DIRECTORY:
            yield skipped(str(file), "dicomdir", "a DICOMDIR (media directory), not an instance")
        else:
            yield instance


def syntax_groups(syntaxes: Collection[str]) -> list[list[str]]:
    """Transfer syntax lists to propose for one SOP class.

    Each syntax the files have gets a context of its own, so the peer cannot answer it with
    another; one more context offers the uncompressed syntaxes we can convert to.
    """
    groups = [[ts] for ts in sorted(syntaxes)]
    fallback = [str(ts) for ts in UNCOMPRESSED_SYNTAXES if ts not in syntaxes]
    if set(syntaxes) - {IMPLICIT_VR_LITTLE_ENDIAN} and fallback:
        groups.append(fallback)
    return groups


def _needs(instances: Iterable[Instance]) -> dict[str, set[str]]:
    needs: dict[str, set[str]] = {}
    for instance in instances:
        needs.setdefault(instance.sop_class, set()).add(instance.transfer_syntax)
    return needs


def contexts_for(instances: Iterable[Instance]) -> list[PresentationContext]:
    """The presentation contexts to propose for sending `instances`."""
    return [PresentationContext(abstract_syntax=sop_class, transfer_syntax=list(group))
            for sop_class, syntaxes in sorted(_needs(instances).items())
            for group in syntax_groups(syntaxes)]


def _context_count(needs: dict[str, set[str]]) -> int:
    return sum(len(syntax_groups(syntaxes)) for syntaxes in needs.values())


def split_batches(instances: Sequence[Instance],
                  max_contexts: int = MAX_CONTEXTS) -> list[list[Instance]]:
    """Group instances so that each group needs at most `max_contexts` contexts (first fit)."""
    batches: list[tuple[list[Instance], dict[str, set[str]]]] = []
    for instance in instances:
        sop_class, syntax = instance.sop_class, instance.transfer_syntax
        for members, needs in batches:
            grown = {**needs, sop_class: needs.get(sop_class, set()) | {syntax}}
            if syntax in needs.get(sop_class, ()) or _context_count(grown) <= max_contexts:
                members.append(instance)
                needs[sop_class] = grown[sop_class]
                break
        else:
            batches.append(([instance], {sop_class: {syntax}}))
    return [members for members, _ in batches]


# What the C-STORE statuses mean (PS3.4 B.2.3 and the general statuses of PS3.7 C), for
# the words in a record; a range's meaning holds for every code in it.
STORAGE_STATUS_MEANINGS: dict[int, str] = {
    0x0000: "",
    0x0105: "No Such Attribute",
    0x0106: "Invalid Attribute Value",
    0x0107: "Attribute List Error",
    0x0110: "Processing Failure",
    0x0111: "Duplication SOP Instance",
    0x0112: "No Such SOP Instance",
    0x0113: "No Such Event Type",
    0x0114: "No Such Argument",
    0x0115: "Invalid Argument Value",
    0x0116: "Attribute Value Out of Range",
    0x0117: "Invalid Object Instance",
    0x0118: "No Such SOP Class",
    0x0119: "Class-Instance Conflict",
    0x0120: "Missing Attribute",
    0x0121: "Missing Attribute Value",
    0x0122: "Refused: SOP Class Not Supported",
    0x0123: "No Such Action",
    0x0124: "Refused: Not Authorised",
    0x0210: "Duplicate Invocation",
    0x0211: "Unrecognised Operation",
    0x0212: "Mistyped Argument",
    0x0213: "Resource Limitation",
    0xB000: "Coercion of Data Elements",
    0xB006: "Element Discarded",
    0xB007: "Data Set Does Not Match SOP Class",
    0xFE00: "",
}
STORAGE_STATUS_RANGES = (
    (0xA700, 0xA7FF, "Refused: Out of Resources"),
    (0xA900, 0xA9FF, "Data Set Does Not Match SOP Class"),
    (0xC000, 0xCFFF, "Cannot Understand"),
)


def status_meaning(code: int) -> str:
    """What a C-STORE status code means ("unknown status" for a code not defined)."""
    if code in STORAGE_STATUS_MEANINGS:
        return STORAGE_STATUS_MEANINGS[code]
    return next((meaning for low, high, meaning in STORAGE_STATUS_RANGES if low <= code <= high),
                "unknown status")


def _status_text(code: int) -> str:
    return f"0x{code:04X} ({status_meaning(code).lower()})"


ODD_LENGTH_FIX = "odd-length dataset padded to even length"  # DCMTK refuses odd PDVs


def _rewrite(instance: Instance, accepted: Collection[str], dest: Path) -> Record:
    """Write a repaired or converted copy of the instance to `dest`; returns record fields."""
    target = instance.transfer_syntax
    converting = target not in accepted
    if converting:
        target = next((str(ts) for ts in UNCOMPRESSED_SYNTAXES if ts in accepted), "")
        if not target:
            raise PacsError(f"the peer accepted neither {uid_name(instance.transfer_syntax)} nor "
                            "an uncompressed syntax for this SOP class",
                            code="no-common-transfer-syntax")
    fixed = list(instance.fixes) + ([ODD_LENGTH_FIX] if instance.odd_length else [])
    if not (converting or instance.fixes or instance.odd_fragments):
        # Only the length is wrong: a trailing NUL keeps every byte as it was.
        shutil.copyfile(instance.path, dest)
        with open(dest, "ab") as out:
            out.write(b"\x00")
        return {"transfer_syntax": target, "fixed": fixed}
    import pydicom  # only here: sending files as they are needs neither pydicom nor numpy
    from pydicom.uid import UID

    from pacscli.dicom.transcode import convert, fix_odd_fragments, write_part10

    try:
        ds = pydicom.dcmread(instance.path)
    except Exception as exc:
        raise InvalidDicomError(f"unreadable DICOM dataset: {exc}") from exc
    for keyword in IDENTITY:
        if keyword in ds:
            ds[keyword].value = clean_uid(ds[keyword].value)
    ds.SOPClassUID, ds.SOPInstanceUID = instance.sop_class, instance.sop_uid
    ds.file_meta.MediaStorageSOPClassUID = instance.sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = instance.sop_uid
    ds.file_meta.TransferSyntaxUID = instance.transfer_syntax
    fields: Record = {"transfer_syntax": target}
    if converting:
        convert(ds, UID(target))
        fields["converted_from"] = instance.transfer_syntax
    elif padded := fix_odd_fragments(ds):
        fixed.append(f"{padded} odd-length pixel data fragment(s) padded to even length")
    write_part10(ds, dest)
    if fixed:
        fields["fixed"] = fixed
    return fields


def _as_stored(assoc: ClientAssociation, instance: Instance | None) -> tuple[Context, DatasetFile] | None:
    """The context and dataset of an instance that goes out as its bytes on disk, for the
    association to read ahead; None for one that must be rewritten first."""
    if instance is None or instance.needs_rewrite:
        return None
    context = assoc.context_for(instance.sop_class, instance.transfer_syntax)
    return None if context is None else (context, DatasetFile(instance.path, instance.dataset_offset))


def _send_one(assoc: ClientAssociation, instance: Instance, remote: Remote, workdir: Path,
              errors: list[NetworkError], upcoming: Instance | None = None) -> Record:
    """C-STORE one instance on an established association; its result record. The
    `upcoming` instance, sent next, is read ahead while the peer stores this one."""
    base = instance.record(remote)
    accepted = assoc.accepted_syntaxes(instance.sop_class)
    if not accepted:
        name = uid_name(instance.sop_class)
        return failed(PacsError(f"{remote} accepted no presentation context for {name}",
                                code="sop-class-not-accepted"), **base)
    fields: Record = {"transfer_syntax": instance.transfer_syntax}
    temp: Path | None = None
    try:
        path = instance.path
        if instance.needs_rewrite or instance.transfer_syntax not in accepted:
            temp = path = workdir / f"{uuid.uuid4().hex}.dcm"
            fields = _rewrite(instance, accepted, temp)
        context = assoc.context_for(instance.sop_class, str(fields["transfer_syntax"]))
        assert context is not None  # _rewrite picked an accepted syntax
        offset = instance.dataset_offset if temp is None else None  # a rewrite: found on opening
        response = assoc.c_store(context, instance.sop_uid, DatasetFile(path, offset),
                                 upcoming=_as_stored(assoc, upcoming))
    except PacsError as exc:
        return failed(exc, **base, **fields)
    except SendStalled as exc:
        assoc.abort()
        error = NetworkError(f"{exc}: it stopped reading while this instance was sent",
                             code="peer-stalled")
        errors.append(error)
        return failed(error, **base, **fields)
    except TimeoutError:
        assoc.abort()
        error = NetworkError(f"no C-STORE response from {remote} within {assoc.dimse_timeout:g} s",
                             code="no-response")
        errors.append(error)
        return failed(error, **base, **fields)
    except ProtocolBroken as exc:  # we aborted
        error = NetworkError(f"{remote} broke the DICOM protocol while this instance was sent "
                             f"({exc}); the association was aborted", code="invalid-response")
        errors.append(error)
        return failed(error, **base, **fields)
    except (AssociationClosed, OSError) as exc:
        assoc.abort()
        error = NetworkError(f"{remote} aborted the association or closed the connection while "
                             f"this instance was sent ({exc})", code="association-aborted")
        errors.append(error)
        return failed(error, **base, **fields)
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)
    code = response.status
    result: Record = {**base, "status": "ok", "dimse_status": code, **fields}
    detail = _status_text(code) + (f": {response.error_comment}" if response.error_comment else "")
    if code in WARNING_STATUSES:
        result.update(status="warning", warning=detail)
    elif code != 0:
        result.update(failed(PacsError(f"{remote} answered C-STORE with failure status {detail}",
                                       code="store-failed")))
    return result


def _send_share(settings: Settings, remote: Remote, instances: Sequence[Instance],
                workdir: Path, errors: list[NetworkError],
                stop: threading.Event) -> Iterator[Record]:
    """Send a share of the instances over as many associations as their contexts need.

    When an association ends early, the instance in flight fails and a new association
    carries the rest; when none can be made, every instance left gets a failed record.
    """
    batches = split_batches(instances)
    for number, batch in enumerate(batches):
        pending = list(batch)
        while pending and not stop.is_set():
            try:
                assoc = request_association(settings, remote, contexts_for(pending), workdir)
            except NetworkError as exc:
                errors.append(exc)
                if exc.code == "no-accepted-context":  # other batches may hold other classes
                    yield from (failed(exc, **i.record(remote)) for i in pending)
                    break
                for instance in [*pending, *(i for b in batches[number + 1:] for i in b)]:
                    yield failed(exc, **instance.record(remote))
                return
            try:
                while pending and assoc.established and not stop.is_set():
                    instance = pending.pop(0)
                    record = _send_one(assoc, instance, remote, workdir, errors,
                                       upcoming=pending[0] if pending else None)
                    yield record
                    error = record.get("error")
                    if isinstance(error, dict) and error.get("code") == "no-response":
                        # A peer that stopped answering would cost the DIMSE timeout again
                        # for each instance left, for hours: they are not sent.
                        left = [*pending, *(i for b in batches[number + 1:] for i in b)]
                        gave_up = NetworkError(f"not sent: {remote} stopped answering (no C-STORE "
                                               "response within the DIMSE timeout)", code="no-response")
                        yield from (failed(gave_up, **i.record(remote)) for i in left)
                        return
            except BaseException:  # Ctrl-C, or our reader went away: do not wait on the peer
                assoc.abort()
                raise
            if stop.is_set():
                assoc.abort()
            elif assoc.established:
                assoc.release()


# Input records, read ahead in a thread, are sent in rounds: those that have come, up to
# ROUND_MAX, once none came for ROUND_WAIT s. Paths given as arguments make one round;
# records that trickle in (`pacs serve | pacs store OTHER`, a forwarder) go as they come.
ROUND_MAX = 10_000
ROUND_WAIT = 0.05
_END = object()


def _rounds(records: Iterator[Record]) -> Iterator[list[Record]]:
    """`records`, read in a thread of their own (stdin may block), in rounds as they come.
    An exception of the reading (a line that is not JSON...) is raised here."""
    ready: queue.SimpleQueue[object] = queue.SimpleQueue()

    def read() -> None:
        try:
            for record in records:
                ready.put(record)
        except BaseException as exc:  # handed to the consumer's thread
            ready.put(exc)
        ready.put(_END)

    threading.Thread(target=read, name="store-input", daemon=True).start()
    ended = False
    while not ended:
        batch: list[Record] = []
        item = ready.get()
        while True:
            if item is _END:
                ended = True
                break
            if isinstance(item, BaseException):
                if batch:  # the records before the bad one are sent and reported first
                    yield batch
                raise item
            batch.append(item)  # type: ignore[arg-type]
            if len(batch) >= ROUND_MAX:
                break
            try:
                item = ready.get(timeout=ROUND_WAIT)
            except queue.Empty:
                break
        if batch:
            yield batch


def _in_threads(shares: list[Iterator[Record]], stop: threading.Event) -> Iterator[Record]:
    """Run each share's generator in its own thread; yield their records as they come."""
    results: queue.Queue[Record | BaseException | None] = queue.Queue()

    def pump(share: Iterator[Record]) -> None:
        try:
            for record in share:
                results.put(record)
        except BaseException as exc:  # handed to the consumer's thread
            results.put(exc)
        finally:
            results.put(None)

    threads = [threading.Thread(target=pump, args=(share,), daemon=True, name=f"store-{n}")
               for n, share in enumerate(shares)]
    for thread in threads:
        thread.start()
    try:
        running = len(threads)
        while running:
            item = results.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=10)


def store(settings: Settings, remote: Remote, records: Iterable[Record], *, jobs: int = 1,
          progress: Progress | None = None, resolve: Resolver | None = None) -> Iterator[Record]:
    """C-STORE the files named by `records` (files or folders, or UIDs `resolve` finds
    files for) to `remote`.

    Yields one record per file: ok, warning, failed or skipped (not DICOM). Files are read
    (headers only) before the first association, since contexts are negotiated up front.
    Raises UsageError when there is no input at all, and NetworkError at the end when no
    instance could be sent because of the network.
    """
    if jobs < 1:
        raise UsageError("--jobs must be at least 1")
    given = numbered = known = answered = done = 0  # given: read ahead; numbered: collected
    errors: list[NetworkError] = []

    def counted() -> Iterator[Record]:
        nonlocal given
        for record in records:
            given += 1
            yield record

    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="pacs-store-", ignore_cleanup_errors=True) as tmp:
        try:
            for batch in _rounds(counted()):
                instances: list[Instance] = []
                # Files are read here, not in the thread reading the input: beside the
                # sending, that thread held the GIL while answers waited for it.
                for item in collect(batch, resolve, first=numbered + 1):
                    if isinstance(item, Instance):
                        instances.append(item)
                    else:
                        yield item
                numbered += len(batch)
                known += len(instances)
                stop = threading.Event()  # each round's: _in_threads sets it as it ends
                shares = [_send_share(settings, remote, instances[n::jobs], Path(tmp), errors, stop)
                          for n in range(min(jobs, len(instances)))]
                stream = shares[0] if len(shares) == 1 else _in_threads(shares, stop)
                for record in stream:
                    done += 1
                    answered += "dimse_status" in record
                    if progress is not None:
                        progress(done, known)
                    yield record
        finally:
            stop.set()
    if not given:
        raise UsageError("nothing to store: give files or folders, or records with a path (or "
                         "the UIDs of archived instances) on stdin", code="no-input")
    if not known:
        log.warning("no DICOM instance to send among the inputs")
    if not answered and errors:
        raise errors[0]

