"""The acceptor side of the DICOM upper layer (PS3.8) for `pacs serve`.

pynetdicom's acceptor polls its queues with 1 ms sleeps in two threads per association and
builds every command set through pydicom datasets: measured here, it alone tops out near
0.2x DCMTK's storescp, and it accepts PDUs of any size. This server keeps one thread per
association that blocks on its socket, frames PDUs itself, and hands each complete DIMSE
message to a service function. The association PDUs (A-ASSOCIATE-RQ/AC/RJ) are
pacscli.net.pdu's; pynetdicom stays the library for every SCU but `pacs store`.

Limits enforced here (DESIGN.md section 5): an A-ASSOCIATE-RQ over 1 MiB, a P-DATA PDU over
the maximum we advertised, a release or abort PDU of other than 4 bytes, a command set over
64 KiB, or an unknown PDU type aborts the association; the A-ASSOCIATE-RQ must come whole
within the ACSE timeout; at most `max_associations` run at once, later ones are rejected
(transient, local limit exceeded), and connections not yet associated beyond twice that
(plus 16) are closed at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from pacscli import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from pacscli.dicom.identity import seek_dataset
from pacscli.net.dimse import C_CANCEL_RQ, Command, CommandError, decode_command
from pacscli.net.pdu import (
    ABSTRACT_SYNTAX_NOT_SUPPORTED,
    ACCEPTANCE,
    APPLICATION_CONTEXT,
    NO_REASON,
    TRANSFER_SYNTAXES_NOT_SUPPORTED,
    Associate,
    PduError,
    PresentationContext,
    Rejection,
    decode_rq,
    encode_ac,
    encode_rj,
)

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE = 0x01, 0x02, 0x03
P_DATA_TF_TYPE, A_RELEASE_RQ_TYPE, A_RELEASE_RP_TYPE, A_ABORT_TYPE = 0x04, 0x05, 0x06, 0x07
MIN_RATE = 1024  # bytes/s: the slowest steady sender a PDU's time allows for (8 kbit/s)
_FOUR_BYTE_PDUS = (A_ASSOCIATE_RJ_TYPE, A_RELEASE_RQ_TYPE, A_RELEASE_RP_TYPE, A_ABORT_TYPE)

MAX_ASSOCIATE_PDU = 1024 * 1024
MAX_COMMAND = 64 * 1024  # a command set is a few hundred bytes; its fragments stop here
# Datasets up to this size are received in memory; larger ones go to a staging file as
# they arrive, so a 1 GB instance never sits in memory.
SPILL_THRESHOLD = 16 * 1024 * 1024
SINK_STEP = 128 * 1024  # a dataset sink gets the bytes in pieces of at most this size
_DEFAULT_SEND_PDU = 1024 * 1024  # when the peer advertises 0 (unlimited)
_SEND_BATCH = 1024 * 1024  # dataset bytes read and sent per system call
_COMMAND_ROOM = 512  # room before a dataset's first PDUs for the command PDU (~200 bytes)
_PDU_PDV = struct.Struct(">BBIIBB")  # a P-DATA-TF PDU header and its one PDV's header

# A-ABORT reasons (PS3.8 9.3.8), source 2 = service provider
ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU, ABORT_INVALID_PARAMETER = 1, 2, 6


class AssociationClosed(Exception):
    """The peer closed the connection, aborted, or broke the protocol."""


class ProtocolBroken(AssociationClosed):
    """The peer broke the protocol (a bad command set, a PDV out of place): we aborted."""


@dataclass(frozen=True)
class Context:
    """An accepted presentation context."""

    id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass
class ServerConfig:
    """What the acceptor negotiates: identity, limits and supported contexts."""

    ae_title: str
    supported: dict[str, frozenset[str]]  # abstract syntax -> transfer syntaxes
    max_pdu: int = 1024 * 1024
    allow: tuple[str, ...] = ()
    require_called_aet: bool = True
    max_associations: int = 16
    acse_timeout: float = 30.0
    network_timeout: float = 60.0
    tls: ssl.SSLContext | None = None  # accept TLS connections only, with this context
    # SOP class -> the extended negotiation options we support, one byte each (1: yes)
    extended: dict[str, bytes] = field(default_factory=dict)


class DatasetSink(Protocol):
    """Where a service writes a dataset through while it arrives (the archive's staging
    file of a C-STORE): it sees every fragment of a dataset received in memory."""

    def write_through(self, data: memoryview) -> None:
        """Take the next fragment (errors are the sink's to keep)."""

    def finish(self) -> None:
        """The dataset's last fragment has come."""

    def discard(self) -> None:
        """Drop what was written, unless it was taken; may be called more than once."""


class ReceivedDataset:
    """A received dataset: bytes in memory, or a raw dataset file in staging when large.

    In memory, the dataset lives in a buffer its association reuses from one message to
    the next: a fresh 512 KiB buffer per instance cost ~0.3 ms of page faults here. A
    `sink` also gets each fragment as it comes, until the dataset spills to a file.
    """

    def __init__(self, staging: Path, buffer: bytearray, sink: DatasetSink | None = None) -> None:
        self._staging = staging
        self.buffer = buffer  # the association takes it back, grown, for the next message
        self.sink = sink
        self._file: BinaryIO | None = None
        self.path: Path | None = None
        self.error: OSError | None = None  # a write error while spilling (disk full)
        self.size = 0

    def receive(self, read_into: Callable[[memoryview], None], length: int) -> None:
        """Append one fragment of `length` bytes, read by `read_into` (which fills the
        view it is given) straight into the buffer, or through it into the spill file."""
        if self._file is None and self.size + length > SPILL_THRESHOLD:
            self._spill()
        if self._file is None:
            self._reserve(self.size + length)
            fragment = memoryview(self.buffer)[self.size:self.size + length]
            if self.sink is None:
                read_into(fragment)
            else:  # in steps, so that the sink works while the rest arrives
                for start in range(0, length, SINK_STEP):
                    piece = fragment[start:start + SINK_STEP]
                    read_into(piece)
                    self.sink.write_through(piece)
        else:
            self._reserve(min(length, 1024 * 1024))
            view = memoryview(self.buffer)
            left = length
            while left:
                piece = view[:min(left, len(view))]
                read_into(piece)  # read whatever happens to the spill file: the stream goes on
                left -= len(piece)
                self._write(piece)
        self.size += length

    def _reserve(self, capacity: int) -> None:
        if capacity > len(self.buffer):
            grown = bytearray(max(capacity, 2 * len(self.buffer)))
            grown[:self.size] = memoryview(self.buffer)[:self.size]
            self.buffer = grown

    def _spill(self) -> None:
        if self.sink is not None:  # a dataset this large is put from its spill file
            self.sink.discard()
            self.sink = None
        try:
            fd, name = tempfile.mkstemp(suffix=".raw", dir=self._staging)
            self._file, self.path = os.fdopen(fd, "wb"), Path(name)
        except OSError as exc:
            self._failed(exc)
            self._file = open(os.devnull, "wb")  # noqa: SIM115 - drain what the peer still sends
            return
        self._write(memoryview(self.buffer)[:self.size])

    def _write(self, data: memoryview) -> None:
        if self.error is not None:
            return
        assert self._file is not None
        try:
            self._file.write(data)
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        log.error("cannot write a received dataset to staging: %s", exc)
        self.error = exc

    def finish(self) -> None:
        """Close the spill file, keeping a late write error."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                self.error = self.error or exc

    def content(self) -> memoryview | Path:
        """The dataset: a view of its bytes (valid until the association's next message),
        or the path of its raw dataset file."""
        return self.path if self.path is not None else memoryview(self.buffer)[:self.size]

    def discard(self) -> None:
        """Remove the spill file, if any, and what the sink holds unless it was taken."""
        if self.sink is not None:
            self.sink.discard()
        self.finish()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class DatasetFile:
    """A dataset to send from a Part 10 file: its bytes from `offset` to the end; without
    an offset, from the end of the file meta, found when the file is opened."""

    path: Path
    offset: int | None = None


class OutgoingDataset:
    """A dataset file on its way out: the open file, where its unread bytes start, how many
    are left, and where its PDUs read so far end in the association's send buffer."""

    def __init__(self, dataset: DatasetFile, context_id: int, source: BinaryIO) -> None:
        self.dataset = dataset
        self.context_id = context_id
        self.source = source
        offset = dataset.offset if dataset.offset is not None else seek_dataset(source)
        self.position = offset
        self.remaining = os.fstat(source.fileno()).st_size - offset
        self.end = 0


class Association:
    """One association, accepted or requested: its socket, contexts and DIMSE messages."""

    def __init__(self, sock: socket.socket, address: tuple[str, int], *, max_pdu: int,
                 staging: Path, dataset_sink: SinkFactory | None = None) -> None:
        self.sock = sock
        self.address = address
        self.max_pdu = max_pdu  # what we advertised: P-DATA PDUs larger than this are refused
        self.staging = staging  # where datasets too large for memory are received
        self.dataset_sink = dataset_sink  # gives the sink of each dataset that comes
        self.calling_aet = ""
        self.called_aet = ""
        self.contexts: dict[int, Context] = {}
        self.roles: dict[str, tuple[bool, bool]] = {}  # SOP class -> (scu_role, scp_role)
        self.extended: dict[str, bytes] = {}  # SOP class -> the extended options agreed
        self.peer_max_pdu = _DEFAULT_SEND_PDU
        self.established = False
        self.busy = False  # between the first PDV of a message and its response
        self._send_lock = threading.Lock()
        self._message_id = 0
        self.cancelled: set[int] = set()  # message IDs the peer sent C-CANCEL for
        self._dataset_buffer = bytearray()  # reused by each received dataset in turn
        # Room for a command PDU, then a batch of dataset PDUs: reused by each dataset sent
        # from a file (a fresh buffer filled by joining PDVs cost ~0.5 ms per CT slice).
        self._send_buffer = bytearray()
        self._pdu_left = 0  # bytes of the current P-DATA PDU not read yet (PDVs of a next message)
        # While set (time.monotonic()), reads end there whatever the peer sends: the ACSE
        # timeout bounds a whole A-ASSOCIATE-RQ, not each read, so a byte every few
        # seconds cannot hold a connection open.
        self.deadline: float | None = None
        # Once associated: how long a PDU may take to arrive, so that a peer trickling bytes
        # (each read within the network timeout) cannot hold its slot for ever: the network
        # timeout, plus a second for each MIN_RATE bytes it holds (a slow link's steady
        # sender is not cut). Checked before each read, not set on the socket (a system
        # call per read): a PDU is cut at most one network timeout past its own.
        self.pdu_timeout: float | None = None
        self._pdu_deadline: float | None = None

    # -- framing ---------------------------------------------------------------------------

    def _recv_exact(self, size: int) -> bytearray:
        buffer = bytearray(size)
        self._recv_into(memoryview(buffer))
        return buffer

    def _recv_into(self, view: memoryview) -> None:
        """Fill `view` from the socket (TimeoutError past `deadline`, when one is set)."""
        got, size = 0, len(view)
        while got < size:
            if self.deadline is not None:
                left = self.deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out")
                self.sock.settimeout(left)
            elif self._pdu_deadline is not None and time.monotonic() > self._pdu_deadline:
                raise TimeoutError(f"a PDU came slower than {MIN_RATE} bytes/s, past the "
                                   f"{self.pdu_timeout:g} s network timeout")
            n = self.sock.recv_into(view[got:], size - got)
            if n == 0:
                raise AssociationClosed("the peer closed the connection")
            got += n

    def recv_pdu(self) -> tuple[int, bytearray]:
        """Read one PDU: its type and its body (without the 6-byte header)."""
        pdu_type, length = self._recv_pdu_header()
        return pdu_type, self._recv_exact(length)

    def _recv_pdu_header(self, *, clock: bool = False) -> tuple[int, int]:
        """Read a PDU header and check the PDU's type and length; return both. With `clock`,
        the PDU's time (`pdu_timeout`) starts with its first byte; the caller restarts it
        with the PDU's length."""
        if clock:
            # The clock starts with the first read that brings any of it (however long the
            # association was idle), in one system call when the header comes whole.
            header = bytearray(6)
            got = self.sock.recv_into(header, 6)
            if got == 0:
                raise AssociationClosed("the peer closed the connection")
            if got < 6:  # the rest of it on the clock (the caller sets it for the body)
                self._pdu_clock(True)
                self._recv_into(memoryview(header)[got:])
        else:
            header = self._recv_exact(6)
        pdu_type, length = header[0], struct.unpack_from(">I", header, 2)[0]
        if pdu_type == P_DATA_TF_TYPE and length > self.max_pdu:
            self.abort(ABORT_INVALID_PARAMETER)
            raise AssociationClosed(f"P-DATA-TF of {length} bytes exceeds our maximum {self.max_pdu}")
        if pdu_type in (A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE) and length > MAX_ASSOCIATE_PDU:
            self.abort(ABORT_INVALID_PARAMETER)
            raise AssociationClosed(f"association PDU of {length} bytes exceeds 1 MiB")
        # Their bodies are 4 bytes (PS3.8 9.3.4, 9.3.6-9.3.8): a longer claim is never read,
        # so a peer cannot make us hold gigabytes for it.
        if pdu_type in _FOUR_BYTE_PDUS and length != 4:
            self.abort(ABORT_INVALID_PARAMETER)
            raise AssociationClosed(f"PDU type 0x{pdu_type:02x} of {length} bytes, not 4")
        if pdu_type not in (A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE,
                            P_DATA_TF_TYPE, A_RELEASE_RQ_TYPE, A_RELEASE_RP_TYPE, A_ABORT_TYPE):
            self.abort(ABORT_UNRECOGNIZED_PDU)
            raise AssociationClosed(f"unrecognised PDU type 0x{pdu_type:02x}")
        return pdu_type, length

    def send_pdu(self, pdu_type: int, *parts: bytes | memoryview) -> None:
        """Send one PDU made of `parts`."""
        length = sum(len(p) for p in parts)
        header = struct.pack(">BBI", pdu_type, 0, length)
        with self._send_lock:
            self.sock.sendall(header + b"".join(parts) if length < 65536 else header)
            if length >= 65536:
                for part in parts:
                    self.sock.sendall(part)

    def abort(self, reason: int = 0, source: int = 2) -> None:
        """Send an A-ABORT (best effort) and close."""
        with contextlib.suppress(OSError):
            self.send_pdu(A_ABORT_TYPE, bytes([0, 0, source, reason]))
        self.close()

    def close(self) -> None:
        """Close the socket; the association is over."""
        self.established = False
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    # -- DIMSE -------------------------------------------------------------------------------

    def send_message(self, context_id: int, command: bytes,
                     dataset: bytes | memoryview | OutgoingDataset | None = None) -> None:
        """Send a DIMSE message: the command, then the dataset in PDVs that fit the peer.

        The dataset is bytes, or a file's dataset opened with `open_dataset` (streamed, so a
        1 GB instance never sits in memory; the file is closed once sent).
        """
        if isinstance(dataset, OutgoingDataset):
            self._send_file(dataset, command)
            return
        self.send_pdu(P_DATA_TF_TYPE, struct.pack(">IBB", len(command) + 2, context_id, 0x03), command)
        if dataset is None:
            return
        step = max(self.peer_max_pdu - 6, 1024)
        # Many PDUs per sendall: a peer with a 16 KiB maximum would otherwise cost a system
        # call every 16 KiB (34 per CT slice).
        batch = max(step, _SEND_BATCH // step * step)
        view = memoryview(dataset)
        for start in range(0, max(len(view), 1), batch):
            piece_view = view[start:start + batch]
            self._send_pdvs(context_id, piece_view, step, last=start + batch >= len(view))

    def open_dataset(self, context_id: int, dataset: DatasetFile) -> OutgoingDataset:
        """Open a dataset file and read its first batch of PDUs, before anything is sent:
        whatever is wrong with the file (OSError, or InvalidDicomError for a file meta that
        cannot be read) shows before the message starts."""
        source = open(dataset.path, "rb")  # noqa: SIM115 - closed once sent
        try:
            outgoing = OutgoingDataset(dataset, context_id, source)
            self._read_batch(outgoing)
        except BaseException:
            source.close()
            raise
        return outgoing

    def _read_batch(self, outgoing: OutgoingDataset) -> None:
        """Frame the next batch of the dataset's PDUs in the send buffer, after the command
        room, reading the file straight into place between the PDU headers."""
        step = max(self.peer_max_pdu - 6, 1024)  # dataset bytes per PDV
        per_batch = max(1, _SEND_BATCH // step)
        needed = _COMMAND_ROOM + per_batch * (_PDU_PDV.size + step)
        if len(self._send_buffer) < needed:
            self._send_buffer = bytearray(needed)
        buffer, view = self._send_buffer, memoryview(self._send_buffer)
        end, slots = _COMMAND_ROOM, []
        for _ in range(per_batch):
            length = min(step, outgoing.remaining)
            outgoing.remaining -= length
            _PDU_PDV.pack_into(buffer, end, P_DATA_TF_TYPE, 0, length + 6, length + 2, outgoing.context_id,
                               0x02 if outgoing.remaining == 0 else 0x00)
            end += _PDU_PDV.size
            slots.append(view[end:end + length])
            end += length
            if outgoing.remaining == 0:
                break
        outgoing.position += _read_into(outgoing.source, outgoing.position, slots)
        outgoing.end = end

    def _send_file(self, outgoing: OutgoingDataset, command: bytes) -> None:
        """Send the command PDU and the dataset's PDUs, the command with the first batch (in
        the room left for it before them); closes the file."""
        head = _PDU_PDV.pack(P_DATA_TF_TYPE, 0, len(command) + 6, len(command) + 2, outgoing.context_id,
                             0x03) + command
        try:
            start = _COMMAND_ROOM - len(head)
            if start < 0:  # overlong UIDs: the command goes in a call of its own
                self.send_pdu(P_DATA_TF_TYPE, head[6:])
                start = _COMMAND_ROOM
            else:
                self._send_buffer[start:_COMMAND_ROOM] = head
            while True:
                with self._send_lock:
                    self.sock.sendall(memoryview(self._send_buffer)[start:outgoing.end])
                if outgoing.remaining == 0:
                    return
                self._read_batch(outgoing)
                start = _COMMAND_ROOM
        finally:
            outgoing.source.close()

    def _send_pdvs(self, context_id: int, data: memoryview, step: int, *, last: bool) -> None:
        """Send `data` as P-DATA-TF PDUs of one dataset PDV each, in one system call."""
        out = bytearray()
        for start in range(0, max(len(data), 1), step):
            chunk = data[start:start + step]
            control = 0x02 if last and start + step >= len(data) else 0x00
            out += _PDU_PDV.pack(P_DATA_TF_TYPE, 0, len(chunk) + 6, len(chunk) + 2, context_id,
                                 control)
            out += chunk
        with self._send_lock:
            self.sock.sendall(out)

    def receive_message(self) -> tuple[Context, Command, ReceivedDataset | None] | None:
        """The next complete DIMSE message, or None when the peer released the association.

        P-DATA PDUs are read PDV by PDV: dataset fragments go from the socket straight
        into the dataset's buffer (or its spill file), with no copy of the PDU between.
        """
        command_bytes = bytearray()
        command: Command | None = None
        context: Context | None = None
        message_context: int | None = None
        dataset: ReceivedDataset | None = None
        try:
            while True:
                if self._pdu_left:  # the PDU that ended the last message holds more PDVs
                    pdu_type, length, self._pdu_left = P_DATA_TF_TYPE, self._pdu_left, 0
                    self._pdu_clock(True, length)
                else:
                    pdu_type, length = self._recv_pdu_header(clock=True)
                    self._pdu_clock(True, length)  # its time, now that its length is known
                if pdu_type != P_DATA_TF_TYPE:
                    self._recv_exact(length)
                    if pdu_type == A_RELEASE_RQ_TYPE:
                        if command is not None or command_bytes:
                            self.abort(ABORT_UNEXPECTED_PDU)  # the peer hears why it ends
                            raise AssociationClosed("release requested in the middle of a message")
                        self.send_pdu(A_RELEASE_RP_TYPE, bytes(4))
                        return None
                    if pdu_type == A_ABORT_TYPE:
                        raise AssociationClosed("the peer aborted the association")
                    self.abort(ABORT_UNEXPECTED_PDU)
                    raise AssociationClosed(f"unexpected PDU type 0x{pdu_type:02x}")
                self.busy = True
                left = length
                while left:
                    if left < 6:
                        raise self._protocol_error("truncated PDV item")
                    header = self._recv_exact(6)
                    item_length = struct.unpack_from(">I", header)[0]
                    context_id, control = header[4], header[5]
                    if item_length < 2 or item_length + 4 > left:
                        raise self._protocol_error("PDV item length out of bounds")
                    left -= 4 + item_length
                    if context_id not in self.contexts:
                        raise self._protocol_error(f"PDV on context {context_id}, not accepted")
                    if message_context is None:
                        message_context = context_id
                    elif context_id != message_context:  # PS3.8 9.3.5.1: one context a message
                        raise self._protocol_error(f"PDV on context {context_id} in a message "
                                                   f"begun on context {message_context}")
                    if control & 0x01:  # command fragment
                        if command is not None:
                            raise self._protocol_error("a second command before the dataset")
                        if len(command_bytes) + item_length - 2 > MAX_COMMAND:
                            raise self._protocol_error(f"a command set over {MAX_COMMAND} bytes")
                        command_bytes += self._recv_exact(item_length - 2)
                        if control & 0x02:
                            try:
                                command = decode_command(bytes(command_bytes))
                            except CommandError as exc:
                                raise self._protocol_error(f"bad command set: {exc}") from exc
                            context = self.contexts[context_id]
                            if not command.has_dataset:
                                self._pdu_left = left
                                return context, command, None
                            sink = None
                            if self.dataset_sink is not None:
                                sink = self.dataset_sink(self, context, command)
                            dataset = ReceivedDataset(self.staging, self._dataset_buffer, sink)
                    else:
                        if command is None or dataset is None:
                            raise self._protocol_error("dataset fragment before its command")
                        dataset.receive(self._recv_into, item_length - 2)
                        self._dataset_buffer = dataset.buffer  # grown, kept for the next one
                        if control & 0x02:
                            self._pdu_left = left
                            dataset.finish()
                            if dataset.sink is not None:
                                dataset.sink.finish()
                            assert context is not None
                            return context, command, dataset
        except BaseException:
            if dataset is not None:
                dataset.discard()
            raise
        finally:
            self._pdu_clock(False)

    def _pdu_clock(self, running: bool, length: int = 0) -> None:
        """Start (`running`) or stop the time a PDU of `length` bytes may take."""
        self._pdu_deadline = (time.monotonic() + self.pdu_timeout + length / MIN_RATE
                              if running and self.pdu_timeout is not None else None)

    def cancel_requested(self, message_id: int) -> bool:
        """True when the peer has sent C-CANCEL for `message_id` (checked without waiting).

        Called between the responses a C-FIND, C-MOVE or C-GET streams. Without an
        asynchronous operations window, nothing but a C-CANCEL may arrive meanwhile.
        """
        if message_id in self.cancelled:
            return True
        # Under TLS, bytes already decrypted wait in the SSL object, not the socket.
        pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable and not pending:
            return False
        message = self.receive_message()
        if message is None:
            raise AssociationClosed("the peer released the association during an operation")
        _, command, dataset = message
        if dataset is not None:
            dataset.discard()
        if not self.note_cancel(command):
            raise self._protocol_error(
                f"DIMSE command 0x{command.field:04x} while message {message_id} is in progress")
        return message_id in self.cancelled

    def note_cancel(self, command: Command) -> bool:
        """Remember a C-CANCEL; False when `command` is something else."""
        if command.field != C_CANCEL_RQ:
            return False
        self.cancelled.add(command.number("MessageIDBeingRespondedTo"))
        return True

    def next_message_id(self) -> int:
        """A message ID for a request we send (C-STORE sub-operations of a C-GET)."""
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def _protocol_error(self, message: str) -> ProtocolBroken:
        self.abort(ABORT_INVALID_PARAMETER)
        return ProtocolBroken(message)

    def __str__(self) -> str:
        return f"{self.calling_aet or '?'}@{self.address[0]}:{self.address[1]}"


def _read_into(source: BinaryIO, position: int, slots: list[memoryview]) -> int:
    """Fill `slots` with the file's bytes from `position` on; return how many were read.

    One preadv system call where the platform has it; otherwise, or when it reads short,
    a read into each slot. Raises OSError when the file ends first.
    """
    wanted = sum(len(slot) for slot in slots)
    if hasattr(os, "preadv") and os.preadv(source.fileno(), slots, position) == wanted:
        return wanted
    source.seek(position)
    for slot in slots:
        if source.readinto(slot) != len(slot):  # type: ignore[attr-defined]
            raise OSError("the file ended before the dataset did")
    return wanted


# A service answers one DIMSE message; it sends its responses through the association.
Service = Callable[[Association, Context, Command, ReceivedDataset | None], None]
# For a command whose dataset is about to arrive: the sink to write it through, or None.
SinkFactory = Callable[[Association, Context, Command], DatasetSink | None]


@dataclass
class AssociationServer:
    """Listens, negotiates, and runs each association in its own thread."""

    config: ServerConfig
    services: dict[int, Service]
    staging: Path
    on_released: Callable[[Association], None] | None = None
    dataset_sink: SinkFactory | None = None  # see Association.dataset_sink
    _sock: socket.socket | None = None
    _threads: dict[threading.Thread, Association] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stopping: threading.Event = field(default_factory=threading.Event)
    _acceptor: threading.Thread | None = None
    _past_grace: bool = False  # stop(): associations are aborted at their next message
    _admit_lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, bind: str, port: int) -> tuple[str, int]:
        """Listen on bind:port (port 0 picks one) and accept in the background."""
        family = socket.AF_INET6 if ":" in bind else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind, port))
        sock.listen(64)
        sock.settimeout(0.2)  # so the accept loop notices a stop
        self._sock = sock
        self._acceptor = threading.Thread(target=self._accept_loop, name="dicom-accept", daemon=True)
        self._acceptor.start()
        host, bound = sock.getsockname()[:2]
        return str(host), int(bound)

    def active(self) -> list[Association]:
        """The associations running now."""
        with self._lock:
            return [a for t, a in self._threads.items() if t.is_alive()]

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                client, address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self._stopping.is_set():
                    return
                # Out of descriptors or memory: the connections open now will end; wait
                # for that rather than stop accepting for good.
                log.warning("cannot accept a connection: %s; trying again", exc.strerror or exc)
                time.sleep(0.5)
                continue
            if len(self.active()) >= self._max_connections():
                log.warning("refused a connection from %s:%s: %d connections open already "
                            "(max_associations is %d)", *address[:2], len(self.active()),
                            self.config.max_associations)
                client.close()
                continue
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.settimeout(self.config.acse_timeout)
            assoc = Association(client, address[:2], max_pdu=self.config.max_pdu,
                                staging=self.staging, dataset_sink=self.dataset_sink)
            thread = threading.Thread(target=self._run, args=(assoc,), name=f"assoc-{address[1]}",
                                      daemon=True)
            with self._lock:
                self._threads = {t: a for t, a in self._threads.items() if t.is_alive()}
                self._threads[thread] = assoc
            thread.start()

    def _max_connections(self) -> int:
        """Connections open at once, associated or not yet: room beyond max_associations
        for those to be rejected politely, and for probes, but not without end (each holds
        a thread and a descriptor)."""
        return 2 * self.config.max_associations + 16

    def _run(self, assoc: Association) -> None:
        # One ACSE timeout for the TLS handshake and the association request together: a
        # client slow in the one and then silent in the other held the connection twice as long.
        deadline = time.monotonic() + self.config.acse_timeout
        try:
            if self.config.tls is not None and not self._handshake(assoc, self.config.tls):
                return
            if not self._negotiate(assoc, deadline):
                return
            assoc.sock.settimeout(self.config.network_timeout)
            assoc.pdu_timeout = self.config.network_timeout
            while True:
                if self._stopping.is_set() and self._past_grace:
                    log.warning("aborting association with %s at shutdown", assoc)
                    assoc.abort()
                    return
                message = assoc.receive_message()
                if message is None:
                    log.info("association with %s released", assoc)
                    return
                context, command, dataset = message
                if command.field == C_CANCEL_RQ:  # for an operation that ended as it came
                    log.info("%s cancelled message %d, which is over", assoc,
                             command.number("MessageIDBeingRespondedTo"))
                    assoc.busy = False
                    continue
                service = self.services.get(command.field)
                try:
                    if service is None:
                        log.warning("%s sent DIMSE command 0x%04x, which we do not serve",
                                    assoc, command.field)
                        assoc.abort(ABORT_UNEXPECTED_PDU)
                        return
                    service(assoc, context, command, dataset)
                finally:
                    assoc.busy = False
                    if dataset is not None:
                        dataset.discard()
        except (AssociationClosed, OSError) as exc:
            if self._past_grace:  # aborted by stop(), which said so
                log.info("association with %s closed at shutdown: %s", assoc, exc)
            elif isinstance(exc, TimeoutError):
                log.warning("association with %s timed out (%s); aborting", assoc, exc)
                assoc.abort()
            elif isinstance(exc, AssociationClosed):  # not released: worth a line without -v
                log.warning("association with %s ended without a release: %s", assoc, exc)
            else:
                log.warning("association with %s lost: %s", assoc, exc)
        except Exception:
            log.exception("error in association with %s; aborting", assoc)
            assoc.abort()
        finally:
            assoc.close()
            if self.on_released is not None:
                self.on_released(assoc)

    def _handshake(self, assoc: Association, context: ssl.SSLContext) -> bool:
        """The TLS handshake, in the association's own thread (a slow peer holds up no
        other) and within the ACSE timeout set on the socket; False when it failed."""
        try:
            assoc.sock = context.wrap_socket(assoc.sock, server_side=True)
        except OSError as exc:  # ssl.SSLError is one
            from pacscli.net.tls import client_handshake_problem

            # A connection closed before a word (a probe, a health check) is no failure.
            quiet = isinstance(exc, ssl.SSLEOFError | ConnectionResetError)
            log.log(logging.INFO if quiet else logging.WARNING, "TLS handshake with %s:%s "
                    "failed: %s", *assoc.address, client_handshake_problem(exc))
            return False
        return True

    def _negotiate(self, assoc: Association, deadline: float) -> bool:
        """Read the A-ASSOCIATE-RQ by `deadline` (monotonic) and accept or reject it."""
        assoc.deadline = deadline
        try:
            pdu_type, body = assoc.recv_pdu()
        except (AssociationClosed, TimeoutError, OSError) as exc:
            log.info("connection from %s:%s closed before associating: %s", *assoc.address, exc)
            return False
        finally:
            assoc.deadline = None
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            assoc.abort(ABORT_UNEXPECTED_PDU)
            return False
        try:
            request = decode_rq(body)
        except PduError as exc:
            log.warning("undecodable A-ASSOCIATE-RQ from %s:%s: %s", *assoc.address, exc)
            assoc.abort(ABORT_INVALID_PARAMETER)
            return False
        assoc.calling_aet = request.calling_ae_title
        assoc.called_aet = request.called_ae_title
        reject = self._rejection(assoc, request) or self._admit(assoc)
        if reject is not None:
            rejection, why = reject
            log.warning("rejected association from %s (called %s): %s", assoc, assoc.called_aet, why)
            self._send_reject(assoc, rejection)
            return False
        assoc.peer_max_pdu = request.max_pdu or _DEFAULT_SEND_PDU
        results = self._negotiate_contexts(assoc, request.contexts)
        # Roles are answered for the SOP classes of accepted contexts only (PS3.7 D.3.3.4)
        accepted = {c.abstract_syntax for c in assoc.contexts.values()}
        assoc.roles = {uid: role for uid, role in request.roles.items() if uid in accepted}
        # Each option asked for and supported is agreed (PS3.7 D.3.3.5); others are not.
        assoc.extended = {
            uid: bytes(int(asked == 1 and i < len(ours) and ours[i] == 1)
                       for i, asked in enumerate(info))
            for uid, info in request.extended.items()
            if uid in accepted and (ours := self.config.extended.get(uid)) is not None}
        self._send_accept(assoc, request, results)
        log.info("association from %s accepted with %d contexts", assoc, len(assoc.contexts))
        return True

    def _rejection(self, assoc: Association, request: Associate) -> tuple[Rejection, str] | None:
        """The rejection (PS3.8 9.3.4) and why, when the request must be rejected."""
        config = self.config
        if request.application_context != APPLICATION_CONTEXT:
            return Rejection(1, 1, 2), f"application context {request.application_context} not supported"
        if config.allow and assoc.calling_aet not in config.allow:
            return Rejection(1, 1, 3), f"calling AE title {assoc.calling_aet!r} is not in the allow list"
        if config.require_called_aet and assoc.called_aet != config.ae_title:
            return Rejection(1, 1, 7), (f"called AE title {assoc.called_aet!r} is not ours "
                                        f"({config.ae_title!r})")
        if self._stopping.is_set():
            return Rejection(2, 3, 1), "shutting down"
        return None

    def _admit(self, assoc: Association) -> tuple[Rejection, str] | None:
        """Count `assoc` among the associations (established), unless max_associations are
        running: then the rejection. One at a time, so that requests arriving together
        cannot all pass the count before any is counted."""
        with self._admit_lock:
            running = sum(1 for a in self.active() if a.established)
            if running >= self.config.max_associations:
                return Rejection(2, 3, 2), f"already {running} associations (max_associations)"
            assoc.established = True
        return None

    def _negotiate_contexts(self, assoc: Association,
                            requested: Iterable[PresentationContext]) -> list[PresentationContext]:
        """Accept each context whose abstract syntax we support with the first transfer
        syntax the requestor lists that we support: the archive keeps what the modality
        encoded, not a conversion made for us."""
        results = []
        seen: set[int] = set()
        bad_ids: list[int] = []
        for rq in requested:
            duplicate = rq.context_id in seen
            seen.add(rq.context_id)
            if rq.context_id % 2 == 0 or duplicate:
                # An ID must be odd and name one context (PS3.8 9.3.2.2): a second one
                # would silently take the first one's place.
                bad_ids.append(rq.context_id)
                results.append(PresentationContext(rq.context_id, rq.abstract_syntax,
                                                   [rq.transfer_syntax[0]], NO_REASON))
                continue
            ours = self.config.supported.get(rq.abstract_syntax)
            chosen = None if ours is None else next((ts for ts in rq.transfer_syntax if ts in ours), None)
            if chosen is None:
                # A context not accepted still names a transfer syntax, which is not tested.
                result = ABSTRACT_SYNTAX_NOT_SUPPORTED if ours is None else TRANSFER_SYNTAXES_NOT_SUPPORTED
                results.append(PresentationContext(rq.context_id, rq.abstract_syntax,
                                                   [rq.transfer_syntax[0]], result))
                continue
            results.append(PresentationContext(rq.context_id, rq.abstract_syntax, [chosen], ACCEPTANCE))
            assoc.contexts[rq.context_id] = Context(rq.context_id, rq.abstract_syntax, chosen)
        if bad_ids:  # one line, however many (a request may hold thousands)
            shown = ", ".join(map(str, sorted(set(bad_ids))[:10]))
            log.warning("%s proposed %d presentation contexts with an ID used before or even "
                        "(%s%s): refused", assoc, len(bad_ids), shown,
                        ", ..." if len(set(bad_ids)) > 10 else "")
        return results

    def _send_accept(self, assoc: Association, request: Associate,
                     results: list[PresentationContext]) -> None:
        accept = Associate(request.called_ae_title, request.calling_ae_title, results,
                           max_pdu=self.config.max_pdu, implementation_class_uid=IMPLEMENTATION_CLASS_UID,
                           implementation_version_name=IMPLEMENTATION_VERSION_NAME,
                           roles=dict(assoc.roles), extended=dict(assoc.extended))
        assoc.send_pdu(A_ASSOCIATE_AC_TYPE, encode_ac(accept))

    @staticmethod
    def _send_reject(assoc: Association, rejection: Rejection) -> None:
        with contextlib.suppress(OSError):
            assoc.send_pdu(A_ASSOCIATE_RJ_TYPE, encode_rj(rejection))

    def stop(self, grace: float = 12.0) -> None:
        """Stop accepting; let associations end by themselves for `grace` seconds, then
        abort each at its next message boundary (a message in flight is finished), all
        within ~2 s more."""
        self._stopping.set()
        if self._sock is not None:
            self._sock.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=2)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            active = self.active()
            if not active:
                return
            for assoc in active:
                if not assoc.established:
                    assoc.close()  # still negotiating, or a bare TCP probe: nothing in flight
            time.sleep(0.05)
        self._past_grace = True
        for assoc in self.active():
            if not assoc.busy:
                log.warning("aborting association with %s at shutdown: still open after the "
                            "%g s grace, between messages (nothing in flight is lost)",
                            assoc, grace)
                assoc.abort()
        hard = time.monotonic() + 2.5
        while self.active() and time.monotonic() < hard:
            time.sleep(0.05)
        for assoc in self.active():
            log.warning("aborting association with %s mid-message at shutdown", assoc)
            assoc.abort()
