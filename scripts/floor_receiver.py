"""The least a durable C-STORE receiver in Python does: a yardstick for bench_serve.

Usage: python scripts/floor_receiver.py --port P --dir DIR [--aet AET]

Not a server to use: one association at a time, every proposed context accepted with the
first transfer syntax it lists, no checks on what arrives. For each C-STORE it does only
what `pacs serve` must do before its success status, in the cheapest way Python allows:

- one thread reads the socket straight into page-aligned buffers and writes each 4 KiB-
  aligned run with direct I/O (`O_DIRECT`) into a staging file, after a Part 10 header;
- a second thread computes the sha256 meanwhile (hashlib releases the GIL);
- then `fdatasync`, rename into DIR/files/, fsync of that folder, and one row (SOP
  Instance UID, path, size, sha256) committed to a SQLite index in WAL mode;
- then the C-STORE response.

No header parsing, no Q/R attributes, no records, logs, locks or conflict policy. Whatever
this takes, `pacs serve` under its default settings cannot take less on this machine, so
bench_serve prints its time beside storescp's: the ratio of this floor to storescp bounds the
ratio any Python receiver that writes durably can reach here.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import mmap
import os
import queue
import socket
import sqlite3
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pacscli.dicom.part10 import part10_header
from pacscli.net.dimse import (
    C_ECHO_RQ,
    C_ECHO_RSP,
    C_STORE_RQ,
    C_STORE_RSP,
    NO_DATASET,
    Command,
    decode_command,
    encode_command,
)
from pacscli.net.pdu import Associate, PresentationContext, decode_rq, encode_ac

_ALIGN = 4096  # direct I/O writes whole 4 KiB blocks from aligned memory
_WRITE_AT = 128 * 1024  # write once this much is buffered
_BUFFERS = 4  # page-aligned buffers in turn: one fills while the hash thread reads others
_BUFFER_SIZE = 2 * 1024 * 1024  # room for a buffered run plus one more PDV of up to 1 MiB
_MAX_PDU = 1024 * 1024
_PDU = struct.Struct(">B1xI")  # PDU type, length
_PDV = struct.Struct(">IBB")  # PDV length, context ID, control header


@dataclass
class Incoming:
    """A dataset being received: its staging file, where it goes, and its hash so far."""

    fd: int
    path: Path
    sop_uid: str
    digest: hashlib._Hash
    fill: int = 0  # bytes in the current buffer, not written yet
    offset: int = 0  # bytes written to the file


class Receiver:
    """One association: the socket, the buffers, the hash thread and the index."""

    def __init__(self, sock: socket.socket, folder: Path, db: sqlite3.Connection) -> None:
        self.sock = sock
        self.folder = folder
        self.db = db
        self.memory = mmap.mmap(-1, _BUFFERS * _BUFFER_SIZE)
        whole = memoryview(self.memory)
        self.buffers = [whole[i * _BUFFER_SIZE:(i + 1) * _BUFFER_SIZE] for i in range(_BUFFERS)]
        self.turn = 0
        self.free = threading.Semaphore(_BUFFERS - 1)  # buffers not waiting to be hashed
        self.hash_jobs: queue.SimpleQueue[tuple[hashlib._Hash, memoryview, bool] | None] = \
            queue.SimpleQueue()
        self.digests: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.count = 0
        self.syntaxes: dict[int, str] = {}  # context ID -> accepted transfer syntax
        self.hasher = threading.Thread(target=self._hash, daemon=True)
        self.hasher.start()

    def close(self) -> None:
        """Stop the hash thread."""
        self.hash_jobs.put(None)
        self.hasher.join()

    def _hash(self) -> None:
        while (job := self.hash_jobs.get()) is not None:
            digest, data, last = job
            digest.update(data)
            self.free.release()
            if last:
                self.digests.put(digest.hexdigest())

    def read_into(self, view: memoryview) -> None:
        """Fill `view` from the socket; EOFError when the peer closes first."""
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if not n:
                raise EOFError("the peer closed the connection")
            got += n

    def read(self, length: int) -> bytes:
        """The next `length` bytes."""
        data = bytearray(length)
        self.read_into(memoryview(data))
        return bytes(data)

    def send_pdu(self, pdu_type: int, body: bytes) -> None:
        self.sock.sendall(_PDU.pack(pdu_type, len(body)) + body)

    def associate(self) -> None:
        """Answer the A-ASSOCIATE-RQ: accept every context with its first syntax."""
        pdu_type, length = _PDU.unpack(self.read(6))
        if pdu_type != 0x01:
            raise EOFError(f"expected an A-ASSOCIATE-RQ, got PDU type 0x{pdu_type:02x}")
        request = decode_rq(self.read(length))
        answers = [PresentationContext(c.context_id, transfer_syntax=c.transfer_syntax[:1], result=0)
                   for c in request.contexts]
        self.syntaxes = {c.context_id: c.transfer_syntax[0] for c in request.contexts}
        self.send_pdu(0x02, encode_ac(Associate(request.called_ae_title, request.calling_ae_title, answers,
                                                max_pdu=_MAX_PDU, implementation_class_uid="1.2.3.4")))

    def serve(self) -> None:
        """Messages until the release (EOFError when the peer goes)."""
        fragments = bytearray()
        command: Command | None = None
        incoming: Incoming | None = None
        while True:
            pdu_type, length = _PDU.unpack(self.read(6))
            if pdu_type == 0x05:  # A-RELEASE-RQ
                self.read(length)
                self.send_pdu(0x06, bytes(4))
                return
            if pdu_type != 0x04:
                raise EOFError(f"PDU type 0x{pdu_type:02x}")
            left = length
            while left:
                pdv_length, context_id, control = _PDV.unpack(self.read(6))
                size = pdv_length - 2
                left -= 6 + size
                if control & 0x01:  # a command fragment
                    fragments += self.read(size)
                    if control & 0x02:
                        command = decode_command(bytes(fragments))
                        fragments.clear()
                        if command.field == C_ECHO_RQ:
                            self.respond(context_id, command, C_ECHO_RSP)
                        elif command.field == C_STORE_RQ:
                            incoming = self.begin(command, self.syntaxes[context_id])
                    continue
                if incoming is None or command is None:
                    raise EOFError("a dataset without a C-STORE request")
                self.read_into(self.buffers[self.turn][incoming.fill:incoming.fill + size])
                incoming.fill += size
                last = bool(control & 0x02)
                if incoming.fill >= _WRITE_AT or last:
                    self.write(incoming, last)
                if last:
                    self.finish(incoming)
                    self.respond(context_id, command, C_STORE_RSP)
                    incoming = None

    def begin(self, command: Command, transfer_syntax: str) -> Incoming:
        """A staging file for the dataset; its Part 10 header goes first into the buffer."""
        sop_uid = command.get("AffectedSOPInstanceUID")
        path = self.folder / "staging" / f"{self.count}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
        header = part10_header(sop_class_uid=command.get("AffectedSOPClassUID"), sop_instance_uid=sop_uid,
                               transfer_syntax=transfer_syntax)
        self.buffers[self.turn][:len(header)] = header
        return Incoming(fd, path, sop_uid, hashlib.sha256(), fill=len(header))

    def write(self, incoming: Incoming, last: bool) -> None:
        """Write the buffer's aligned run (all of it when `last`), hand it to the hash thread,
        and carry the rest over to the next buffer."""
        current = self.buffers[self.turn]
        written = incoming.fill // _ALIGN * _ALIGN
        if written:
            os.pwrite(incoming.fd, current[:written], incoming.offset)
        if last and incoming.fill > written:  # the unaligned end goes through the page cache
            flags = fcntl.fcntl(incoming.fd, fcntl.F_GETFL)
            fcntl.fcntl(incoming.fd, fcntl.F_SETFL, flags & ~os.O_DIRECT)
            os.pwrite(incoming.fd, current[written:incoming.fill], incoming.offset + written)
            written = incoming.fill
        self.hash_jobs.put((incoming.digest, current[:written], last))
        self.free.acquire()
        self.turn = (self.turn + 1) % _BUFFERS
        rest = incoming.fill - written
        self.buffers[self.turn][:rest] = current[written:incoming.fill]
        incoming.fill, incoming.offset = rest, incoming.offset + written

    def finish(self, incoming: Incoming) -> None:
        """Flush, place and index the file."""
        os.fdatasync(incoming.fd)
        os.close(incoming.fd)
        final = self.folder / "files" / f"{incoming.sop_uid}.dcm"
        os.rename(incoming.path, final)
        folder = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
        sha256 = self.digests.get()
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?)",
                            (incoming.sop_uid, str(final), incoming.offset, sha256))
        self.count += 1

    def respond(self, context_id: int, command: Command, field: int) -> None:
        """A success response to `command`."""
        rsp = encode_command(CommandField=field, AffectedSOPClassUID=command.get("AffectedSOPClassUID"),
                             MessageIDBeingRespondedTo=command.message_id, CommandDataSetType=NO_DATASET,
                             Status=0, AffectedSOPInstanceUID=command.get("AffectedSOPInstanceUID") or None)
        self.send_pdu(0x04, _PDV.pack(len(rsp) + 2, context_id, 0x03) + rsp)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    for sub in ("staging", "files"):
        (args.dir / sub).mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(args.dir / "index.sqlite")  # `with db:` commits
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")  # as pacs serve's index
    db.execute("CREATE TABLE IF NOT EXISTS instances "
               "(uid TEXT PRIMARY KEY, path TEXT, size INT, sha256 TEXT)")
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen()
    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.closing(sock):
            receiver = Receiver(sock, args.dir, db)
            try:
                with contextlib.suppress(EOFError, ConnectionError):
                    receiver.associate()
                    receiver.serve()
            finally:
                receiver.close()


if __name__ == "__main__":
    sys.exit(main())
