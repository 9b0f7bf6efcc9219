"""Start-up recovery: files written but not indexed before a crash are indexed, partial ones removed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from dicom_node.db import repo
from dicom_node.db.models import Instance
from dicom_node.app.node import Node
from dicom_node.recovery import CLEAN_STOP_MARKER
from dicom_node.settings import load_settings
from dicom_node.spool import PART_SUFFIX
from tests.conftest import free_port
from training.phantoms.ct_series import GeneratedSeries


def test_unclean_stop_recovers_orphans_and_drops_partials(tmp_path: Path, small_series: GeneratedSeries) -> None:
    settings = load_settings(None, {"data_dir": tmp_path, "dicom.port": free_port(), "web.port": free_port(),
                                    "storage.min_free_mb": 0})
    node = Node(settings)
    node.start()
    ae = AE("RECOVERY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="DICOM_NODE")
    for path in small_series.paths[:3]:
        assert assoc.send_c_store(pydicom.dcmread(path)).Status == 0
    assoc.release()
    node.stop()
    assert (tmp_path / CLEAN_STOP_MARKER).exists()

    # Simulate a crash: a file renamed into place whose row was never committed, a half-written
    # temporary file, and no clean-stop marker.
    stored = repo.find_instance(node.sessions, pydicom.dcmread(small_series.paths[0]).SOPInstanceUID)
    assert stored is not None
    series_dir = (settings.spool_dir / stored.path).parent
    orphan = pydicom.dcmread(small_series.paths[3])
    orphan_path = series_dir / f"{orphan.SOPInstanceUID}.dcm"
    shutil.copy(small_series.paths[3], orphan_path)
    partial = series_dir / f".x.dcm.123{PART_SUFFIX}"
    partial.write_bytes(b"\0" * 100)
    (tmp_path / CLEAN_STOP_MARKER).unlink()

    restarted = Node(settings)
    restarted.start()
    try:
        assert not partial.exists()
        found = repo.find_instance(restarted.sessions, orphan.SOPInstanceUID)
        assert found is not None and restarted.spool.absolute(found.path) == orphan_path
        with restarted.sessions() as session:
            assert session.scalar(select(func.count()).select_from(Instance)) == 4
        assert repo.list_studies(restarted.sessions)[0].instance_count == 4
    finally:
        restarted.stop()
