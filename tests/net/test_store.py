"""The C-STORE SCU core (pacscli.net.store) and its helpers: scanning dirty files, presentation
context planning past 128 contexts, fragment padding, and an association that dies mid-run."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_files
from pydicom.encaps import generate_fragments, parse_basic_offsets
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)

from pacscli.config import Settings, parse_remote
from pacscli.dicom.identity import read_raw_header, read_raw_top_level, seek_dataset
from pacscli.dicom.scan import scan_part10
from pacscli.dicom.transcode import ITEM_TAG, pad_odd_fragments
from pacscli.errors import InvalidDicomError, NetworkError, UsageError
from pacscli.net import server as net_server
from pacscli.net import store as net_store
from pacscli.net.client import ClientAssociation
from pacscli.net.store import (
    MAX_CONTEXTS,
    Instance,
    NotDicomError,
    contexts_for,
    scan,
    split_batches,
    status_meaning,
    store,
    syntax_groups,
)
from tests.conftest import DCMTK_ENV, free_port, require, testdata, wait_for_port
from tests.dicom.test_identity import (
    EXPLICIT,
    IMPLICIT,
    element,
    identity_elements,
    nested_sequences,
    part10,
    pixel_data,
)
from tests.dicom_files import write_instance

CT = "1.2.840.10008.5.1.4.1.1.2"


def _item(data: bytes) -> bytes:
    return ITEM_TAG + struct.pack("<I", len(data)) + data


def write_odd_fragments(path: Path, sop_uid: str = "1.2.826.0.1.3680043.2.1125.77.1") -> Path:
    """The 30-frame JPEG example with two fragments stripped of their pad byte (odd length)
    and a Basic Offset Table that matches; pydicom still decodes it."""
    ds = pydicom.dcmread(testdata("multiframe_us"))
    buffer = BytesIO(ds.PixelData)
    parse_basic_offsets(buffer)
    items, offsets, position, stripped = [], [], 0, 0
    for fragment in generate_fragments(buffer):
        if fragment.endswith(b"\xff\xd9\x00") and stripped < 2:  # an even count keeps the
            fragment, stripped = fragment[:-1], stripped + 1  # whole value even-length
        offsets.append(position)
        items.append(_item(fragment))
        position += len(items[-1])
    assert stripped == 2
    ds.PixelData = _item(struct.pack(f"<{len(offsets)}I", *offsets)) + b"".join(items)
    ds["PixelData"].is_undefined_length = True
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.save_as(path)
    return path


def write_padded_uid(path: Path, uid: str = "1.2.826.0.1.3680043.2.1125.77.2") -> Path:
    """CT_small with a SOP Instance UID padded with a space (dataset and file meta)."""
    ds = pydicom.dcmread(testdata("explicit_le"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid + "0"
    ds.save_as(path)
    # pydicom strips spaces from UIDs it writes: patch the bytes, same length.
    path.write_bytes(path.read_bytes().replace((uid + "0").encode(), uid.encode() + b" "))
    return path


# --- scanning ---------------------------------------------------------------------------------

def test_scan_clean_file() -> None:
    instance = scan(testdata("explicit_le"))
    assert instance.sop_class == CT
    assert instance.sop_uid == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert instance.transfer_syntax == ExplicitVRLittleEndian
    assert not instance.needs_rewrite


def test_scan_padded_uid(tmp_path: Path) -> None:
    instance = scan(write_padded_uid(tmp_path / "padded.dcm"))
    assert instance.sop_uid == "1.2.826.0.1.3680043.2.1125.77.2"
    assert "SOPInstanceUID padding removed" in instance.fixes
    assert "MediaStorageSOPInstanceUID padding removed" in instance.fixes


def test_scan_meta_disagrees_dataset_wins() -> None:
    # rtdose.dcm as bundled: file meta 1.2.999..., dataset 1.9.999...
    instance = scan(testdata("rtdose"))
    assert instance.sop_uid == "1.9.999.999.99.9.9999.9999.20030818153516"
    assert any("differs from the dataset's" in fix for fix in instance.fixes)


def test_scan_odd_fragments_and_odd_length(tmp_path: Path) -> None:
    assert scan(write_odd_fragments(tmp_path / "odd.dcm")).odd_fragments
    assert not scan(testdata("multiframe_us")).odd_fragments
    deflated = scan(testdata("deflated"))  # its deflate stream is stored at an odd length
    assert deflated.transfer_syntax == DeflatedExplicitVRLittleEndian
    assert deflated.odd_length and deflated.needs_rewrite


def test_scan_not_dicom(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not DICOM")
    with pytest.raises(NotDicomError):
        scan(tmp_path / "notes.txt")


def _scan_outcome(path: Path) -> Instance | tuple[type, str]:
    """What scan gives: the Instance, or the error's type and message."""
    try:
        return scan(path)
    except InvalidDicomError as exc:
        return type(exc), str(exc)


def _dirty_files(folder: Path) -> list[Path]:
    """Files with the UID dirt real devices write, in both VR encodings, plus the dirty files
    the other tests send: padded and disagreeing UIDs, odd-length fragments."""
    mismatch = pydicom.dcmread(testdata("explicit_le"))
    mismatch.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.77.3"
    mismatch.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.2.1125.77.4"
    mismatch.save_as(folder / "mismatch.dcm")
    files = [write_padded_uid(folder / "padded.dcm"), write_odd_fragments(folder / "odd.dcm"),
             folder / "mismatch.dcm"]
    for implicit in (False, True):
        syntax = (IMPLICIT if implicit else EXPLICIT).encode()
        uids = partial(identity_elements, implicit)
        cases = {
            "spaces": part10(uids(SOPInstanceUID=b"1.2.3.3 ", StudyInstanceUID=b" 1.2.3.1"), syntax),
            "nuls": part10(uids(SOPInstanceUID=b"1.2.3.3\x00\x00", SeriesInstanceUID=b"1.2.3.22\x00"),
                           syntax),
            "empty_class": part10(uids(SOPClassUID=b""), syntax),
            "meta_differs": part10(uids(), syntax, sop_uid=b"1.2.3.9"),
            "meta_padded": part10(uids(), syntax, sop_uid=b"1.2.3.3\x00\x00 "),
            "syntax_padded": part10(uids(), syntax + b" \x00"),
            "repeated": part10(uids() + element(0x00080018, "UI", b"1.2.3.4 ", implicit), syntax),
            "latin1": part10(uids(SOPInstanceUID=b"1.2.3.\xe9"), syntax),
            "nested": part10(nested_sequences(implicit) + uids(), syntax),
            "pixels": part10(uids() + pixel_data(implicit), syntax),
            "truncated": part10(uids() + pixel_data(implicit), syntax)[:-40],
        }
        for name, data in cases.items():
            path = folder / f"{name}_{'implicit' if implicit else 'explicit'}.dcm"
            path.write_bytes(data)
            files.append(path)
    return files


PYDICOM_FILES = sorted({Path(f) for f in get_testdata_files() if Path(f).is_file()})


def test_a_file_cut_inside_its_meta_is_named_truncated_as_index_names_it(tmp_path: Path) -> None:
    """Every cut between the DICM prefix and the dataset, inside an element or between two:
    store and index both say "the file ends inside the file meta". Store named some cuts
    by what they removed ("the file meta has no Transfer Syntax UID"), and index those that
    fell between two elements."""
    data = testdata("CT_small.dcm").read_bytes()
    offset = scan_part10(data).dataset_offset
    path = tmp_path / "cut.dcm"
    for keep in range(133, offset + 1):
        path.write_bytes(data[:keep])
        with pytest.raises(InvalidDicomError) as sent:
            scan(path)
        with pytest.raises(InvalidDicomError) as indexed:
            scan_part10(data[:keep])
        for exc in (sent.value, indexed.value):
            assert (exc.code, exc.message) == (
                "truncated", "truncated: the file ends inside the file meta"), keep


def test_fast_scan_gives_the_pydicom_scan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """scan reads the identity UIDs with the element walker when it can; every result
    (fixes, odd fragments, odd length, dataset offset, errors) is the pydicom reader's."""
    files = PYDICOM_FILES + _dirty_files(tmp_path)
    fast = {path: _scan_outcome(path) for path in files}
    monkeypatch.setattr(net_store, "read_raw_top_level", lambda *args: None)
    slow = {path: _scan_outcome(path) for path in files}
    assert [p for p in files if fast[p] != slow[p]] == []
    assert any(isinstance(result, Instance) and result.fixes for result in fast.values())


def test_fast_scan_covers_the_common_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    walked: list[bool] = []

    def spy(*args: Any) -> Any:
        raw = read_raw_top_level(*args)
        walked.append(raw is not None)
        return raw

    monkeypatch.setattr(net_store, "read_raw_top_level", spy)
    for path in (testdata("explicit_le"), testdata("implicit_le"), write_padded_uid(tmp_path / "p.dcm")):
        scan(path)
    assert walked == [True, True, True]
    scan(testdata("jpeg_baseline"))  # encapsulated: pydicom's reader finds the fragments
    scan(testdata("explicit_be"))  # not covered by the walker
    assert walked == [True, True, True, False]


def _encapsulated(fragments: list[bytes], before: bytes = b"") -> bytes:
    """Encapsulated Pixel Data (an empty offset table, then the fragments), after `before`."""
    items = _item(b"") + b"".join(_item(f) for f in fragments)
    return (before + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF) + items
            + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))


def _encapsulated_files(folder: Path) -> list[Path]:
    """Encapsulated headers the walker reads up to the pixel data: odd and even fragments,
    an Extended Offset Table or a private group first, no pixel data, nested sequences."""
    jpeg = JPEGBaseline8Bit.encode()
    uids = identity_elements(False)
    cases = {
        "odd": part10(uids + _encapsulated([b"abc", b"de"]), jpeg),
        "even": part10(uids + _encapsulated([b"abcd", b"ef"]), jpeg),
        "offsets_first": part10(uids + _encapsulated([b"abc"], element(0x7FE00001, "OV", bytes(8))), jpeg),
        "private_after": part10(uids + element(0x7FE10010, "LO", b"ACME") + _encapsulated([b"a"]), jpeg),
        "no_pixels": part10(uids, jpeg),
        "nested": part10(nested_sequences(False) + uids + _encapsulated([b"abc"]), jpeg),
        "cut_in_header": part10(uids, jpeg)[:-5],
        "cut_in_pixels": part10(uids + _encapsulated([b"abcd", b"efg"]), jpeg)[:-12],
    }
    for name, data in cases.items():
        (folder / f"encapsulated_{name}.dcm").write_bytes(data)
    return [folder / f"encapsulated_{name}.dcm" for name in cases]


def test_fast_scan_of_encapsulated_files_gives_the_pydicom_scan(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The walker also finds where encapsulated pixel data starts, for the odd-fragment
    check: every result is the one pydicom's reader, stopping before the pixels, gives."""
    files = PYDICOM_FILES + _dirty_files(tmp_path) + _encapsulated_files(tmp_path)
    fast = {path: _scan_outcome(path) for path in files}
    monkeypatch.setattr(net_store, "read_raw_top_level", lambda *args: None)
    monkeypatch.setattr(net_store, "read_raw_header", lambda *args: None)
    slow = {path: _scan_outcome(path) for path in files}
    assert [p for p in files if fast[p] != slow[p]] == []
    encapsulated = [r for r in fast.values()
                    if isinstance(r, Instance) and r.transfer_syntax == JPEGBaseline8Bit]
    assert {r.odd_fragments for r in encapsulated} == {True, False}


def test_the_walker_reads_encapsulated_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    walked: list[bool] = []

    def spy(*args: Any) -> Any:
        header = read_raw_header(*args)
        walked.append(header is not None)
        return header

    monkeypatch.setattr(net_store, "read_raw_header", spy)
    assert scan(write_odd_fragments(tmp_path / "odd.dcm")).odd_fragments
    assert not scan(testdata("jpeg_baseline")).odd_fragments
    assert walked == [True, True]


# --- presentation contexts --------------------------------------------------------------------

def test_syntax_groups() -> None:
    assert syntax_groups({ImplicitVRLittleEndian}) == [[ImplicitVRLittleEndian]]
    assert syntax_groups({ExplicitVRLittleEndian}) == [[ExplicitVRLittleEndian],
                                                        [ImplicitVRLittleEndian]]
    # A compressed syntax alone in its context, the uncompressed fallback in another.
    assert syntax_groups({JPEGBaseline8Bit}) == [[JPEGBaseline8Bit],
                                                 [ExplicitVRLittleEndian, ImplicitVRLittleEndian]]


def _synthetic(count: int, syntax: str = ExplicitVRLittleEndian) -> list[Instance]:
    return [Instance(Path(f"/x/{n}.dcm"), f"1.2.826.0.1.3680043.2.1125.9.{n}", f"1.2.3.{n}", syntax)
            for n in range(count)]


def test_split_batches_past_128_contexts() -> None:
    # 200 SOP classes, two contexts each ([ELE], [ILE]): 64 classes per association at most.
    instances = _synthetic(200) + _synthetic(200)  # the same classes again: no new contexts
    batches = split_batches(instances)
    assert len(batches) == 4
    assert sorted(i.sop_uid for b in batches for i in b) == sorted(i.sop_uid for i in instances)
    for batch in batches:
        contexts = contexts_for(batch)
        assert len(contexts) <= MAX_CONTEXTS
        assert {cx.abstract_syntax for cx in contexts} == {i.sop_class for i in batch}


def test_split_batches_keeps_small_runs_together() -> None:
    instances = _synthetic(10) + _synthetic(3, JPEGBaseline8Bit)
    [batch] = split_batches(instances)
    assert batch == instances
    assert len(contexts_for(batch)) == 10 * 2 + 3  # JPEG adds its own context per class


def test_split_batches_single_class_many_syntaxes() -> None:
    instances = [Instance(Path(f"/x/{n}"), CT, f"1.2.{n}", f"1.2.840.10008.1.2.4.{n}")
                 for n in range(200)]
    batches = split_batches(instances, max_contexts=128)
    assert all(len(contexts_for(b)) <= 128 for b in batches)
    assert sum(len(b) for b in batches) == 200


# --- transcode helpers ------------------------------------------------------------------------

def test_pad_odd_fragments_moves_offsets() -> None:
    fragments = [b"abc", b"de", b"fgh"]  # frame 1: abc+de, frame 2: fgh
    bot = struct.pack("<2I", 0, 8 + 3 + 8 + 2)
    value = _item(bot) + b"".join(_item(f) for f in fragments)
    padded, count = pad_odd_fragments(value)
    assert count == 2
    assert padded == (_item(struct.pack("<2I", 0, 8 + 4 + 8 + 2))
                      + _item(b"abc\x00") + _item(b"de") + _item(b"fgh\x00"))


def test_pad_odd_fragments_drops_a_wrong_table() -> None:
    value = _item(struct.pack("<I", 5)) + _item(b"abc")
    padded, count = pad_odd_fragments(value)
    assert count == 1 and padded == _item(b"") + _item(b"abc\x00")


def test_storage_status_meanings_are_pynetdicoms() -> None:
    """Our table of C-STORE statuses says what pynetdicom's did, for every 16-bit code."""
    from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

    assert {code: status_meaning(code) for code in range(0x10000)} == {
        code: STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1] for code in range(0x10000)}


# --- the core on real associations ------------------------------------------------------------

def test_core_does_not_load_the_cli_libraries() -> None:
    # tqdm is not checked: pydicom itself imports it (pydicom.data's downloader).
    code = ("import sys, pacscli.net.store, pacscli.dicom.transcode; "
            "print([m for m in ('typer', 'rich') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _settings(tmp_path: Path) -> Settings:
    return Settings(archive=tmp_path / "archive")


def test_no_input_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        list(store(_settings(tmp_path), parse_remote("X@127.0.0.1:1"), []))


def test_closed_port_fails_every_instance_then_raises(tmp_path: Path) -> None:
    remote = parse_remote(f"NOBODY@127.0.0.1:{free_port()}")
    records: list[dict[str, Any]] = []
    with pytest.raises(NetworkError) as caught:
        for record in store(_settings(tmp_path), remote,
                            [{"path": str(testdata("explicit_le"))},
                             {"path": str(testdata("jpeg_baseline"))}]):
            records.append(record)
    assert caught.value.code == "connection-failed"
    assert [r["status"] for r in records] == ["failed", "failed"]
    assert all(r["error"]["code"] == "connection-failed" for r in records)


@contextmanager
def vanishing_peer() -> Iterator[tuple[int, list[str]]]:
    """A pynetdicom storage SCP that accepts one C-STORE, then aborts and stops listening."""
    from pynetdicom import AE, AllStoragePresentationContexts, evt

    received: list[str] = []
    ae = AE(ae_title="VANISH")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server: Any = None
    stopper: list[threading.Thread] = []

    def on_store(event: Any) -> int:
        if received:
            if not stopper:  # nothing listens any more
                stopper.append(threading.Thread(target=server.shutdown))
                stopper[0].start()
            event.assoc.abort()
            return 0xA700
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield port, received
    finally:
        if stopper:
            stopper[0].join(10)
        else:
            server.shutdown()


def test_peer_vanishing_mid_run_fails_the_rest(tmp_path: Path) -> None:
    names = ["explicit_le", "implicit_le", "rtdose", "sr"]
    with vanishing_peer() as (port, received):
        records = list(store(_settings(tmp_path), parse_remote(f"VANISH@127.0.0.1:{port}"),
                             [{"path": str(testdata(n))} for n in names]))
    assert len(records) == 4  # none silently lost
    assert records[0]["status"] == "ok" and received == [records[0]["SOPInstanceUID"]]
    assert records[1]["status"] == "failed"
    assert records[1]["error"]["code"] == "association-aborted"
    assert all(r["status"] == "failed" for r in records[2:])
    assert all(r["error"]["code"] in ("connection-failed", "association-aborted")
               for r in records[2:])


def _ct_with_dataset_size(path: Path, size: int, number: int) -> Path:
    """CT_small with pixel data that makes its dataset exactly `size` bytes (even)."""
    ds = pydicom.dcmread(testdata("explicit_le"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.2.1125.78.{number}"
    ds.PixelData = b""
    ds.save_as(path)
    with open(path, "rb") as fp:
        header = len(fp.read()) - seek_dataset(fp)
    ds.PixelData = bytes(range(256)) * ((size - header) // 256) + bytes((size - header) % 256)
    ds.save_as(path)
    return path


def _dataset_bytes(path: Path) -> bytes:
    with open(path, "rb") as fp:
        seek_dataset(fp)
        return fp.read()


@pytest.mark.parametrize("portable", [False, True], ids=["preadv", "portable"])
def test_datasets_of_many_pdus_and_batches_arrive_as_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           portable: bool) -> None:
    """Datasets sent in the smallest PDUs DCMTK takes (4 KiB: 256 PDUs a batch), some over
    several batches, ending on a PDU or batch boundary or not, each read ahead while the peer
    stores the one before: every byte arrives as stored. `portable`: without os.preadv, and
    with each command PDU too long for the room kept for it before the dataset's PDUs."""
    if portable:
        monkeypatch.delattr(os, "preadv", raising=False)
        monkeypatch.setattr(net_server, "_COMMAND_ROOM", 16)
    step = 4096 - 6
    batch = 1024 * 1024 // step * step
    sizes = [2 * batch, 2 * batch + 1000, 10 * step, 6598, 2 * batch + step]
    folder = tmp_path / "in"
    folder.mkdir()
    files = [_ct_with_dataset_size(folder / f"{n}.dcm", size, n) for n, size in enumerate(sizes)]
    assert [len(_dataset_bytes(f)) for f in files] == sizes
    read_ahead: list[bool] = []
    take_ahead = ClientAssociation._take_ahead

    def spy(self: ClientAssociation, *args: Any) -> Any:
        ahead = take_ahead(self, *args)
        read_ahead.append(ahead is not None)
        return ahead

    monkeypatch.setattr(ClientAssociation, "_take_ahead", spy)
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([require("storescp"), "--aetitle", "STORESCP", "+B", "--max-pdu", "4096",
                             "-od", str(out), str(port)], env=DCMTK_ENV, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc=proc)
        records = list(store(_settings(tmp_path), parse_remote(f"STORESCP@127.0.0.1:{port}"),
                             [{"path": str(folder)}]))
    finally:
        proc.terminate()
        proc.wait(10)
    assert [r["status"] for r in records] == ["ok"] * len(files), records
    assert read_ahead == [False] + [True] * (len(files) - 1)
    arrived = {p.name.removeprefix("CT."): _dataset_bytes(p) for p in out.iterdir()}
    assert arrived == {r["SOPInstanceUID"]: _dataset_bytes(Path(r["path"])) for r in records}


@pytest.mark.parametrize("abort", [False, True])
def test_a_peer_that_stops_reading_is_told_from_one_that_does_not_answer(
        tmp_path: Path, abort: bool) -> None:
    """A peer that accepts, then reads no more of a big instance (after an A-ABORT, or
    without a word): the record said "no C-STORE response", though nothing had been sent
    whole, and an A-ABORT waiting to be read went unread."""
    import dataclasses
    import socket as sockets
    import time

    from pacscli.net.pdu import Associate, PresentationContext, decode_rq, encode_ac

    big = write_instance(tmp_path / "big.dcm", rows=3000)  # 18 MB: more than socket buffers
    listener = sockets.create_server(("127.0.0.1", 0))

    def peer() -> None:
        with listener, listener.accept()[0] as conn:
            header = conn.recv(6, sockets.MSG_WAITALL)
            request = decode_rq(conn.recv(struct.unpack(">I", header[2:])[0], sockets.MSG_WAITALL))
            contexts = [PresentationContext(c.context_id, transfer_syntax=[c.transfer_syntax[0]],
                                            result=0) for c in request.contexts]
            accept = encode_ac(Associate(request.called_ae_title, request.calling_ae_title,
                                         contexts, max_pdu=65536, implementation_class_uid="1.2.3"))
            conn.sendall(struct.pack(">BBI", 0x02, 0, len(accept)) + accept)
            if abort:
                conn.sendall(bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 2]))
            time.sleep(6)  # reads nothing more

    threading.Thread(target=peer, daemon=True).start()
    settings = _settings(tmp_path)
    settings = settings.with_changes(network=dataclasses.replace(settings.network, dimse_timeout=1.0))
    remote = parse_remote(f"PEER@127.0.0.1:{listener.getsockname()[1]}")
    with pytest.raises(NetworkError):
        records = []
        for record in store(settings, remote, [{"path": str(big)}]):
            records.append(record)
    [record] = records
    if abort:
        assert record["error"]["code"] == "association-aborted"
        assert "A-ABORT from the service provider, for an unexpected PDU" in record["error"]["message"]
    else:
        assert record["error"]["code"] == "peer-stalled"
        assert "took none of the data sent for 1 s: it stopped reading" in record["error"]["message"]


def test_a_peer_that_stops_answering_costs_one_timeout(tmp_path: Path) -> None:
    """A peer that accepts the association, then never answers a C-STORE: the first
    instance fails on the DIMSE timeout, the rest at once, not sent (each cost the timeout
    again on a new association: 20 files took 60 s at a 3 s timeout)."""
    import dataclasses
    import time

    from pynetdicom import AE, AllStoragePresentationContexts, evt

    def hang(event: Any) -> int:
        time.sleep(8)
        return 0x0000

    ae = AE(ae_title="HANG")
    ae.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, hang)])
    settings = _settings(tmp_path)
    settings = settings.with_changes(network=dataclasses.replace(settings.network, dimse_timeout=1.0))
    names = ["explicit_le", "implicit_le", "rtdose", "sr", "jpeg_baseline"]
    started = time.monotonic()
    records: list[dict[str, Any]] = []
    try:
        with pytest.raises(NetworkError) as caught:  # nothing was answered
            for record in store(settings, parse_remote(f"HANG@127.0.0.1:{port}"),
                                [{"path": str(testdata(n))} for n in names]):
                records.append(record)
        elapsed = time.monotonic() - started
    finally:
        server.shutdown()
    assert caught.value.code == "no-response" and elapsed < 5
    assert [r["error"]["code"] for r in records] == ["no-response"] * len(names)
    assert "stopped answering" in records[-1]["error"]["message"]
