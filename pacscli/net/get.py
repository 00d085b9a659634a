"""C-GET: the core of `pacs get`. The remote sends the instances back on our association
(C-STORE sub-operations, with us in the SCP role), and each goes into the archive through
`Archive.put_received` (the archive's single insert path), or as a Part 10 file under
`--out DIR`.

Yields one record per instance received as it arrives, and a record per request that did
not fully succeed; never prints or exits.

pynetdicom offers at most 128 presentation contexts, so the storage SOP classes we can
receive are chosen: those the input records name (SOPClassUID of image records) first, then
the common ones. An instance of a class left out fails on the remote's side and shows in the
request's failed count.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pynetdicom.sop_class as sop_classes
from pydicom.uid import AllTransferSyntaxes, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import Association, evt
from pynetdicom.presentation import PresentationContext, build_context, build_role

from pacscli.archive.archive import Archive, same_dataset
from pacscli.config import Remote, Settings
from pacscli.dicom.identity import read_received_info
from pacscli.dicom.part10 import part10_header
from pacscli.dicom.query import QR_MODELS, check_level, normalize_model
from pacscli.errors import (
    ArchiveError,
    InvalidDicomError,
    NetworkError,
    OutOfResourcesError,
    PacsError,
    PeerFailure,
    UsageError,
)
from pacscli.net.ae import Watch, abort, associate, make_ae, release, requestor_tls
from pacscli.net.qr import (
    PENDING,
    RetrieveRequest,
    StatusFailure,
    complete_request,
    failed_instances,
    lost,
    outcome,
    sub_operations,
)
from pacscli.net.sop_classes import storage_sop_classes
from pacscli.records import Record, failed

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128
STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES, STATUS_CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
Progress = Callable[[int, int], None]

# Storage SOP classes a PACS commonly holds, in the order they are offered.
COMMON_STORAGE = (
    "CTImageStorage", "EnhancedCTImageStorage", "LegacyConvertedEnhancedCTImageStorage",
    "MRImageStorage", "EnhancedMRImageStorage", "EnhancedMRColorImageStorage",
    "MRSpectroscopyStorage", "UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage",
    "EnhancedUSVolumeStorage", "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation", "DigitalXRayImageStorageForProcessing",
    "DigitalMammographyXRayImageStorageForPresentation",
    "DigitalMammographyXRayImageStorageForProcessing",
    "DigitalIntraOralXRayImageStorageForPresentation", "BreastTomosynthesisImageStorage",
    "BreastProjectionXRayImageStorageForPresentation", "SecondaryCaptureImageStorage",
    "MultiFrameGrayscaleByteSecondaryCaptureImageStorage",
    "MultiFrameGrayscaleWordSecondaryCaptureImageStorage",
    "MultiFrameTrueColorSecondaryCaptureImageStorage",
    "MultiFrameSingleBitSecondaryCaptureImageStorage", "NuclearMedicineImageStorage",
    "PositronEmissionTomographyImageStorage", "EnhancedPETImageStorage",
    "LegacyConvertedEnhancedPETImageStorage", "XRayAngiographicImageStorage",
    "EnhancedXAImageStorage", "XRayRadiofluoroscopicImageStorage", "EnhancedXRFImageStorage",
    "XRay3DAngiographicImageStorage", "XRay3DCraniofacialImageStorage", "RTImageStorage",
    "RTDoseStorage", "RTStructureSetStorage", "RTPlanStorage", "RTIonPlanStorage",
    "RTBeamsTreatmentRecordStorage", "RTIonBeamsTreatmentRecordStorage",
    "RTTreatmentSummaryRecordStorage", "BasicTextSRStorage", "EnhancedSRStorage",
    "ComprehensiveSRStorage", "Comprehensive3DSRStorage", "ExtensibleSRStorage",
    "KeyObjectSelectionDocumentStorage", "XRayRadiationDoseSRStorage",
    "RadiopharmaceuticalRadiationDoseSRStorage", "MammographyCADSRStorage", "ChestCADSRStorage",
    "ProcedureLogStorage", "GrayscaleSoftcopyPresentationStateStorage",
    "ColorSoftcopyPresentationStateStorage", "BlendingSoftcopyPresentationStateStorage",
    "EncapsulatedPDFStorage", "EncapsulatedCDAStorage", "EncapsulatedSTLStorage",
    "SegmentationStorage", "SurfaceSegmentationStorage", "SpatialRegistrationStorage",
    "DeformableSpatialRegistrationStorage", "SpatialFiducialsStorage", "RawDataStorage",
    "RealWorldValueMappingStorage", "VLEndoscopicImageStorage", "VideoEndoscopicImageStorage",
    "VLPhotographicImageStorage", "VideoPhotographicImageStorage", "VLMicroscopicImageStorage",
    "VLSlideCoordinatesMicroscopicImageStorage", "VLWholeSlideMicroscopyImageStorage",
    "OphthalmicPhotography8BitImageStorage", "OphthalmicPhotography16BitImageStorage",
    "OphthalmicTomographyImageStorage", "TwelveLeadECGWaveformStorage",
    "GeneralECGWaveformStorage", "AmbulatoryECGWaveformStorage", "HemodynamicWaveformStorage",
    "BasicVoiceAudioWaveformStorage", "ParametricMapStorage",
)

# What we accept on each SOP class's main storage context: uncompressed first, then every
# other syntax pydicom knows. A sender picks one syntax per context, and most (pacs serve
# among them) pick the first they can: this context brings uncompressed data.
RECEIVE_SYNTAXES = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)] + [
    str(ts) for ts in AllTransferSyntaxes
    if str(ts) not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian)]

# So that an image stored compressed can come as stored (not decoded by the sender, which
# also expands lossy JPEG), the image classes most often stored so get a context of their
# own per common compressed syntax: JPEG baseline, JPEG lossless, JPEG 2000 (lossless and
# lossy) and RLE. The hinted classes come first. 8 classes x 5 syntaxes leave room for the
# main contexts of every class in COMMON_STORAGE.
STORED_SYNTAXES = ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90",
                   "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5")
COMPRESSED_IMAGE_CLASSES = (
    "CTImageStorage", "MRImageStorage", "ComputedRadiographyImageStorage",
    "DigitalXRayImageStorageForPresentation", "DigitalMammographyXRayImageStorageForPresentation",
    "UltrasoundImageStorage", "UltrasoundMultiFrameImageStorage",
    "SecondaryCaptureImageStorage",
)


def storage_classes_to_offer(hints: Iterable[str], room: int) -> list[str]:
    """At most `room` storage SOP class UIDs: the hinted ones, then common, then the rest."""
    chosen: list[str] = []
    common = [str(getattr(sop_classes, name)) for name in COMMON_STORAGE
              if hasattr(sop_classes, name)]
    for uid in [*hints, *common, *(str(u) for u in storage_sop_classes())]:
        if uid and uid not in chosen:
            chosen.append(uid)
        if len(chosen) >= room:
            break
    return chosen


def get_contexts(model: str, hints: Iterable[str]) -> tuple[list[PresentationContext], list[Any]]:
    """The presentation contexts of a C-GET association, and the SCP role selections: for
    each storage class offered, its main context (RECEIVE_SYNTAXES); for the first
    COMPRESSED_IMAGE_CLASSES (hinted image classes first), one more per STORED_SYNTAXES."""
    hints = list(hints)
    contexts = [build_context(QR_MODELS[model]["get"]), build_context(QR_MODELS["study"]["find"])]
    if model == "patient":
        contexts.append(build_context(QR_MODELS["patient"]["find"]))
    images = [str(getattr(sop_classes, name)) for name in COMPRESSED_IMAGE_CLASSES]
    compressed = [uid for uid in dict.fromkeys([*hints, *images]) if uid]
    compressed = compressed[:len(COMPRESSED_IMAGE_CLASSES)]
    room = MAX_CONTEXTS - len(contexts) - len(compressed) * len(STORED_SYNTAXES)
    storage = storage_classes_to_offer(hints, room)
    compressed = [uid for uid in compressed if uid in storage]
    contexts += [build_context(uid, RECEIVE_SYNTAXES) for uid in storage]
    contexts += [build_context(uid, syntax) for uid in compressed for syntax in STORED_SYNTAXES]
    roles = [build_role(uid, scp_role=True) for uid in storage]
    return contexts, roles


class _Receiver:
    """The EVT_C_STORE handler of our C-GET association: stores each instance, queues its
    record for the generator (the handler runs in pynetdicom's association thread)."""

    def __init__(self, remote: Remote, archive: Archive | None, out: Path | None) -> None:
        self.remote = remote
        self.archive = archive
        self.out = out
        self.records: queue.SimpleQueue[Record] = queue.SimpleQueue()

    def handle(self, event: evt.Event) -> int:
        peer = str(event.assoc.acceptor.ae_title).strip() or None
        request = event.request
        base: Record = {"SOPInstanceUID": str(request.AffectedSOPInstanceUID or "").strip(),
                        "remote": str(self.remote)}
        try:
            data = request.DataSet.getvalue() if request.DataSet is not None else b""
            if not data:
                raise InvalidDicomError("C-STORE request without a dataset")
            syntax = str(event.context.transfer_syntax)
            if self.archive is not None:
                result = self.archive.put_received(data, transfer_syntax=syntax, source_aet=peer)
                record = {**result.record(), "remote": str(self.remote)}
            else:
                assert self.out is not None
                record = write_file(self.out, data, syntax, peer)
                record["remote"] = str(self.remote)
        except OutOfResourcesError as exc:
            self.records.put(failed(exc, **base, dimse_status=STATUS_OUT_OF_RESOURCES))
            return STATUS_OUT_OF_RESOURCES
        except InvalidDicomError as exc:
            self.records.put(failed(exc, **base, dimse_status=STATUS_CANNOT_UNDERSTAND))
            return STATUS_CANNOT_UNDERSTAND
        except PacsError as exc:
            self.records.put(failed(exc, **base, dimse_status=STATUS_OUT_OF_RESOURCES))
            return STATUS_OUT_OF_RESOURCES
        except Exception as exc:  # never let a bug abort the association
            log.exception("cannot store %s", base["SOPInstanceUID"])
            error = ArchiveError(f"cannot store the instance: {exc}")
            self.records.put(failed(error, **base, dimse_status=STATUS_OUT_OF_RESOURCES))
            return STATUS_OUT_OF_RESOURCES
        self.records.put({**record, "dimse_status": STATUS_SUCCESS})
        return STATUS_SUCCESS

    def drain(self) -> Iterator[Record]:
        while True:
            try:
                yield self.records.get_nowait()
            except queue.Empty:
                return


def write_file(out: Path, data: bytes, transfer_syntax: str, source_aet: str | None) -> Record:
    """Write a received dataset as a Part 10 file `OUT/STUDY/SERIES/SOP.dcm` (our file meta,
    the dataset bytes as received), through a temporary name; return its record."""
    info = read_received_info(data, transfer_syntax)
    target = out / info.study_uid / info.series_uid / f"{info.sop_uid}.dcm"
    header = part10_header(sop_class_uid=info.sop_class_uid, sop_instance_uid=info.sop_uid,
                           transfer_syntax=transfer_syntax, source_aet=source_aet)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    record: Record = {
        "PatientID": info.attributes.get("PatientID"),
        "StudyInstanceUID": info.study_uid, "SeriesInstanceUID": info.series_uid,
        "SOPInstanceUID": info.sop_uid, "SOPClassUID": info.sop_class_uid,
        "TransferSyntaxUID": transfer_syntax, "path": str(target),
        "size": len(header) + len(data), "status": "ok",
    }
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():  # a file of this instance already there: never overwritten
            if same_dataset(target, data):
                return {**record, "outcome": "duplicate"}
            return {**record, "outcome": "kept", "status": "warning",
                    "warning": "a file with this instance's name but another content (another "
                               "dataset, or not DICOM) is already there; kept it, the one "
                               "received was not written"}
        with open(temporary, "wb") as fp:
            fp.write(header)
            fp.write(data)
        os.replace(temporary, target)
    except OSError as exc:
        with contextlib.suppress(OSError):  # --out a file, not a folder: nothing to remove
            temporary.unlink(missing_ok=True)
        raise OutOfResourcesError(f"cannot write {target}: {exc.strerror or exc}") from exc
    return record


def get(settings: Settings, remote: Remote, requests: Iterable[RetrieveRequest | Record], *,
        model: str = "study", archive: Archive | None = None, out: Path | None = None,
        progress: Progress | None = None) -> Iterator[Record]:
    """C-GET each request from `remote`, as the requests come, into `archive` or `out`: on
    one association, unless a request names a SOP class its contexts left out.

    Yields a record per instance received (the archive's put record, or the file written),
    and for a request that did not fully succeed a record with its QueryRetrieveLevel, UIDs,
    status, dimse_status and completed/failed/warning counts. Records given instead of
    requests (bad input) pass through.

    Raises NetworkError when the association fails, PeerFailure when the peer answered
    every request with a failure status.
    """
    if (archive is None) == (out is None):
        raise UsageError("get needs an archive or an output folder, not both")
    model = normalize_model(model)
    sop_class = QR_MODELS[model]["get"]
    receiver = _Receiver(remote, archive, out)
    watch = Watch()
    ae = make_ae(settings)
    timeout = float(ae.dimse_timeout or 0)
    assoc: Association | None = None
    offered: set[str] = set()  # the storage classes the association's contexts offer
    wanted = refused_by_peer = 0
    last_failure: PeerFailure | None = None
    done_before = 0
    msg_id = 0
    try:
        # Requests are taken as they come (`find | get` starts with find's first match).
        for request in _checked(requests, model, remote):
            if not isinstance(request, RetrieveRequest):
                yield request
                continue
            wanted += 1
            hint = request.sop_class_uid
            if assoc is not None and ((hint and hint not in offered) or not assoc.is_established):
                # A class the contexts leave out (they offer the common ones first), or an
                # association the peer ended: another one, offering that class first.
                release(assoc)
                assoc = None
            if assoc is None:
                contexts, roles = get_contexts(model, [hint] if hint else [])
                try:
                    assoc = associate(ae, remote, contexts=contexts, ext_neg=roles,
                                      evt_handlers=[*watch.handlers(),
                                                    (evt.EVT_C_STORE, receiver.handle)],
                                      tls=requestor_tls(settings, remote))
                except NetworkError as exc:
                    yield failed(exc, **request.fields(), remote=str(remote))
                    raise
                offered = {str(cx.abstract_syntax) for cx in contexts}
                if sop_class not in {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}:
                    error = NetworkError(f"{remote} does not accept C-GET in the "
                                         f"{model.title()} Root model", code="no-accepted-context")
                    yield failed(error, **request.fields(), remote=str(remote))
                    raise error
            base: Record = {**request.fields(), "remote": str(remote)}
            started = time.monotonic()
            try:
                msg_id += 1
                request = complete_request(assoc, request, model, remote, watch, timeout, msg_id)
                base = {**request.fields(), "remote": str(remote)}
                msg_id += 1
                counts: dict[str, int | None] = {}
                final: Any = None
                failed_list: list[str] = []
                identifier = request.identifier(model)
                for status, response in assoc.send_c_get(identifier, sop_class, msg_id=msg_id):
                    yield from receiver.drain()
                    if "Status" not in status:
                        raise lost(watch, remote, "C-GET", started, timeout)
                    found = {k: v for k, v in sub_operations(status).items() if v is not None}
                    counts.update(found)
                    if int(status.Status) in PENDING:
                        if progress is not None and found:
                            done = sum(counts.get(k) or 0 for k in ("completed", "failed",
                                                                     "warning"))
                            progress(done_before + done,
                                     done_before + done + (counts.get("remaining") or 0))
                        started = time.monotonic()
                        continue
                    final = status
                    failed_list = failed_instances(response)
                    break
                yield from receiver.drain()
                if final is None:
                    raise lost(watch, remote, "C-GET", started, timeout)
                record = outcome(final, counts, failed_list, remote, "C-GET")
                done_before += sum(record[k] for k in ("completed", "failed", "warning"))
                if progress is not None:
                    progress(done_before, done_before)
            except StatusFailure as exc:
                yield from receiver.drain()
                refused_by_peer += 1
                last_failure = exc
                yield failed(exc, **base, dimse_status=exc.dimse_status, elapsed_ms=_ms(started))
                continue
            except NetworkError as exc:
                yield from receiver.drain()
                yield failed(exc, **base)
                raise
            except PacsError as exc:
                yield failed(exc, **base, elapsed_ms=_ms(started))
                continue
            if record["status"] != "ok":
                yield {**base, **record, "elapsed_ms": _ms(started)}
    except BaseException:
        if assoc is not None:
            abort(assoc)
        raise
    finally:
        if assoc is not None:
            release(assoc)
    if refused_by_peer == wanted and last_failure is not None:
        raise PeerFailure(last_failure.message if wanted == 1 else
                          f"{remote} answered every C-GET with a failure status; the last: "
                          f"{last_failure.message}", code=last_failure.code)


def _checked(items: Iterable[RetrieveRequest | Record], model: str,
             remote: Remote) -> Iterator[RetrieveRequest | Record]:
    """The requests, as they come; a failed record for one of a level the model lacks, and
    records given instead of requests passed on. UsageError when there is nothing at all."""
    empty = True
    for item in items:
        empty = False
        if isinstance(item, RetrieveRequest):
            try:
                check_level(item.level, model)
            except UsageError as exc:
                yield failed(exc, **item.fields(), remote=str(remote))
                continue
        yield item
    if empty:
        raise UsageError("no input records: nothing to get", code="no-input")


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
