"""A worker's :class:`~dicom_node.study_store.StudyStore` over the node's DICOMweb: no shared filesystem needed.

For each series a job asks for, the store asks the node (QIDO-RS) which instances the
series has, and unless its cache already holds exactly those, fetches the series
(WADO-RS, one streamed ``multipart/related`` answer) into a new folder of its cache
directory, a folder of the worker's own data directory. Each part is written to its
own file as it arrives; the SOP Instance UID is read from each file's header, and the
set fetched must equal the set QIDO named (count and UIDs), else the fetch fails
and nothing of it is kept. A complete fetch is renamed into place, so a folder under
its final name always holds a whole series.

The cache is bounded: after a fetch, the least recently used series are removed until
the cache holds at most ``max_bytes`` (the series just fetched is always kept). The jobs of
one study (segmentation, then detection) find their series there and fetch nothing.
Fetches are serialised within a process (one series at a time on the network).
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.multipart_stream import MultipartError, boundary_of, split_multipart
from dicom_node.node_client import NodeClient, NodeHttpError, quote_path
from dicom_node.spool import uid_to_filename
from dicom_node.study_store import AmbiguousSeries, SeriesNotFound

__all__ = ["DICOMWEB_BASE", "HttpStudyStore", "SeriesFetchError"]

logger = logging.getLogger(__name__)

#: Where the node serves DICOMweb (dicom_node.web.routes.dicomweb.BASE; the web layer is not imported here).
DICOMWEB_BASE = "/api/v1/dicomweb"
_SOP_INSTANCE_UID = "00080018"
_STUDY_INSTANCE_UID = "0020000D"
_CHUNK = 1 << 20
_PARTIAL = ".partial-"


class SeriesFetchError(RuntimeError):
    """A series could not be fetched whole from the node (a network failure, or not the instances QIDO named)."""


def _first_value(entry: dict[str, Any], tag: str) -> str | None:
    values = entry.get(tag, {}).get("Value") or []
    return str(values[0]) if values else None


class _PartFile:
    """One WADO-RS part written to ``path`` as it arrives."""

    def __init__(self, path: Path, headers: dict[str, str]) -> None:
        content_type = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if content_type != "application/dicom":
            raise SeriesFetchError(f"the node sent a part of type {content_type}, not application/dicom")
        self.path = path
        self._handle = open(path, "wb")  # noqa: SIM115 - closed by close()

    def write(self, data: bytes) -> None:
        self._handle.write(data)

    def close(self) -> None:
        self._handle.close()


class HttpStudyStore:
    """Series fetched from the node's DICOMweb into ``cache_dir`` (see the module docstring)."""

    def __init__(self, client: NodeClient, cache_dir: Path, *, max_bytes: int) -> None:
        self._client = client
        self._cache_dir = cache_dir
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        cache_dir.mkdir(parents=True, exist_ok=True)
        for leftover in cache_dir.glob(f"*/{_PARTIAL}*"):  # a fetch a crash interrupted
            shutil.rmtree(leftover, ignore_errors=True)

    def series_files(self, series_instance_uid: str, *, study_instance_uid: str | None = None) -> list[Path]:
        if study_instance_uid is None:
            study_instance_uid = self._study_of(series_instance_uid)
        wanted = self._instances(study_instance_uid, series_instance_uid)
        folder = self._cache_dir / uid_to_filename(study_instance_uid) / uid_to_filename(series_instance_uid)
        with self._lock:
            files = self._cached(folder, wanted)
            if files is None:
                files = self._fetch(study_instance_uid, series_instance_uid, folder, wanted)
            os.utime(folder)  # most recently used
            self._trim(keep=folder)
        return files

    def _study_of(self, series_instance_uid: str) -> str:
        found = self._client.get_json(f"{DICOMWEB_BASE}/series", {"SeriesInstanceUID": series_instance_uid})
        studies = sorted({s for s in (_first_value(e, _STUDY_INSTANCE_UID) for e in found or []) if s})
        if not studies:
            raise SeriesNotFound(f"series {series_instance_uid} has no received instances on the node")
        if len(studies) > 1:
            raise AmbiguousSeries(f"series {series_instance_uid} is in {len(studies)} studies (the sender reused its "
                                  "UID); name the study")
        return studies[0]

    def _instances(self, study: str, series: str) -> set[str]:
        """The SOP Instance UIDs the node holds for the series (QIDO-RS)."""
        path = f"{DICOMWEB_BASE}/studies{quote_path(study)}/series{quote_path(series)}/instances"
        found = self._client.get_json(path)
        uids = {uid for uid in (_first_value(e, _SOP_INSTANCE_UID) for e in found or []) if uid}
        if not uids:
            raise SeriesNotFound(f"series {series} of study {study} has no received instances on the node")
        return uids

    @staticmethod
    def _cached(folder: Path, wanted: set[str]) -> list[Path] | None:
        """The cached files of the series when they are exactly the ``wanted`` instances, else None."""
        if not folder.is_dir():
            return None
        files = sorted(folder.glob("*.dcm"))
        if {f.stem for f in files} != {uid_to_filename(uid) for uid in wanted}:
            return None
        return files

    def _fetch(self, study: str, series: str, folder: Path, wanted: set[str]) -> list[Path]:
        started = time.perf_counter()
        partial = folder.parent / f"{_PARTIAL}{uuid.uuid4().hex}"
        partial.mkdir(parents=True)
        parts: list[_PartFile] = []
        try:
            def open_part(headers: dict[str, str]) -> _PartFile:
                parts.append(_PartFile(partial / f"part-{len(parts):06d}", headers))
                return parts[-1]

            path = f"{DICOMWEB_BASE}/studies{quote_path(study)}/series{quote_path(series)}"
            with self._client.request("GET", path, headers={"Accept": 'multipart/related; type="application/dicom"'}) \
                    as response:
                boundary = boundary_of(response.getheader("Content-Type", ""))
                split_multipart(iter(lambda: response.read(_CHUNK), b""), boundary, open_part)
            fetched = self._name_parts(partial, [p.path for p in parts])
            if set(fetched) != wanted:
                missing, extra = sorted(wanted - set(fetched)), sorted(set(fetched) - wanted)
                raise SeriesFetchError(
                    f"series {series} of study {study}: the node sent {len(fetched)} instance(s) where its index "
                    f"names {len(wanted)}" + (f"; missing {', '.join(missing[:3])}" if missing else "")
                    + (f"; not asked for {', '.join(extra[:3])}" if extra else ""))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(partial, folder)
        except BaseException as exc:
            for part in parts:  # a part the answer broke off in is still open
                part.close()
            shutil.rmtree(partial, ignore_errors=True)
            if isinstance(exc, (MultipartError, NodeHttpError, OSError)):
                raise SeriesFetchError(f"series {series} of study {study} could not be fetched from the node: "
                                       f"{exc}") from exc
            raise
        files = sorted(folder.glob("*.dcm"))
        size = sum(f.stat().st_size for f in files)
        logger.info("fetched series %s (%d instances, %.1f MB) from the node in %.2f s", series, len(files),
                    size / 1e6, time.perf_counter() - started)
        return files

    @staticmethod
    def _name_parts(partial: Path, paths: list[Path]) -> dict[str, Path]:
        """Rename each part to ``<SOP Instance UID>.dcm`` (read from its header); SOP UID -> file."""
        named: dict[str, Path] = {}
        for path in paths:
            try:
                header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                uid = str(header.get("SOPInstanceUID") or header.file_meta.get("MediaStorageSOPInstanceUID", ""))
            except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
                raise SeriesFetchError(f"a part the node sent is not a DICOM file: {type(exc).__name__}: {exc}") \
                    from exc
            if not uid or uid in named:
                raise SeriesFetchError(f"the node sent {'a duplicate of ' + uid if uid else 'an instance without'} "
                                       "SOP Instance UID")
            target = partial / f"{uid_to_filename(uid)}.dcm"
            os.replace(path, target)
            named[uid] = target
        return named

    def _trim(self, keep: Path) -> None:
        """Remove least recently used series until the cache holds at most ``max_bytes`` (``keep`` stays)."""
        folders = [f for f in self._cache_dir.glob("*/*") if f.is_dir() and not f.name.startswith(_PARTIAL)]
        sizes = {f: sum(p.stat().st_size for p in f.glob("*.dcm")) for f in folders}
        total = sum(sizes.values())
        for folder in sorted(folders, key=lambda f: f.stat().st_mtime):
            if total <= self._max_bytes:
                break
            if folder == keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= sizes[folder]
            logger.info("removed series %s from the worker's cache (%.1f MB)", folder.name, sizes[folder] / 1e6)
            if not any(folder.parent.iterdir()):
                folder.parent.rmdir()
