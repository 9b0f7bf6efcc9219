"""The node as a process against the DCMTK tools: the README flow and its edges.

* ``echoscu`` then ``storescu`` (files, and ``+sd`` a directory): the studies are
  listed with their instance counts and become ``complete``.
* A wrong called AE title is rejected (A-ASSOCIATE-RJ), recorded, and the node keeps
  serving.
* Instances compressed by DCMTK (``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``) are stored
  exactly as sent: same transfer syntax, same dataset bytes, never transcoded.
* ``findscu`` is refused cleanly (no Query/Retrieve SOP class: the presentation
  context is rejected) and the node keeps running.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from peers import NodeProcess, dataset_bytes, run_tool, split_part10
from training.phantoms.ct_series import GeneratedSeries

pytestmark = pytest.mark.slow

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _output(result: Any) -> str:
    return f"exit status {result.returncode}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"


def _assert_indexed_and_spooled(node: NodeProcess, series: GeneratedSeries, calling_ae: str) -> None:
    """Every instance of ``series`` is indexed, its file is in the spool, meta names the sender."""
    indexed = {row["sop_instance_uid"]: row for row in node.instances()}
    for path, sop_uid in zip(series.paths, series.sop_instance_uids):
        row = indexed.get(sop_uid)
        assert row is not None, f"{sop_uid} was acknowledged by storescu but is not indexed"
        assert row["study_instance_uid"] == series.study_uid
        assert row["series_instance_uid"] == series.series_uid
        stored = node.spool_file(row["path"])
        assert stored.is_file(), f"indexed path {row['path']} is missing"
        assert stored.stat().st_size == row["size_bytes"]
        meta = pydicom.dcmread(stored, stop_before_pixels=True).file_meta
        assert meta.SourceApplicationEntityTitle.strip() == calling_ae
        assert meta.MediaStorageSOPInstanceUID == sop_uid
        # Uncompressed series sent as Explicit VR LE: the dataset arrives as written.
        assert dataset_bytes(stored) == dataset_bytes(path)


def test_readme_flow_echo_store_files_and_directory(
    node_process: Any, small_series: GeneratedSeries, second_series: GeneratedSeries
) -> None:
    node = node_process()

    echo = node.echo()
    assert echo.returncode == 0, _output(echo)

    pushed = node.storescu(small_series.paths)
    assert pushed.returncode == 0, _output(pushed)
    directory = second_series.paths[0].parent
    assert sorted(directory.iterdir()) == sorted(second_series.paths), "the +sd directory holds only the series"
    scanned = node.storescu([directory], "+sd", "+r")
    assert scanned.returncode == 0, _output(scanned)

    first = node.wait_for_study(small_series.study_uid, state="complete", instances=len(small_series.paths))
    second = node.wait_for_study(second_series.study_uid, state="complete", instances=len(second_series.paths))
    source = pydicom.dcmread(small_series.paths[0], stop_before_pixels=True)
    assert first["series"] == 1 and second["series"] == 1
    assert first["modalities"] == ["CT"]
    assert first["patient_id"] == source.PatientID
    assert first["study_date"] == source.StudyDate
    assert first["late_instances"] == 0 and second["late_instances"] == 0
    assert first["completed_at"] is not None

    _assert_indexed_and_spooled(node, small_series, "STORESCU")
    _assert_indexed_and_spooled(node, second_series, "STORESCU")
    stores = [a for a in node.settled_associations() if a["calling_ae_title"] == "STORESCU"]
    assert sorted(a["instances_stored"] for a in stores) == sorted([len(second_series.paths), len(small_series.paths)])
    assert all(a["outcome"] == "released" and a["instances_failed"] == 0 for a in stores), stores
    assert not list(node.spool_dir.rglob("*.part"))


def test_wrong_called_ae_title_is_rejected_and_node_keeps_serving(
    node_process: Any, small_series: GeneratedSeries
) -> None:
    node = node_process()

    rejected = node.storescu(small_series.paths, called_ae="NOT_THE_NODE")
    assert rejected.returncode != 0, _output(rejected)
    output = rejected.stdout + rejected.stderr
    assert "Association Rejected" in output, _output(rejected)
    assert "Called AE Title Not Recognized" in output, _output(rejected)
    assert node.studies() == []

    records = [a for a in node.associations() if a["called_ae_title"] == "NOT_THE_NODE"]
    assert len(records) == 1, node.associations()
    assert records[0]["outcome"] == "rejected"
    assert records[0]["calling_ae_title"] == "STORESCU"
    assert "NOT_THE_NODE" in records[0]["reject_reason"]
    assert "rejected association from STORESCU" in node.log_text()

    assert node.is_running()
    accepted = node.storescu(small_series.paths)
    assert accepted.returncode == 0, _output(accepted)
    node.wait_for_study(small_series.study_uid, state="complete", instances=len(small_series.paths))


def test_findscu_is_refused_cleanly(node_process: Any, small_series: GeneratedSeries) -> None:
    node = node_process()

    find = run_tool(
        [
            "findscu",
            "-d",
            "-S",
            "-to",
            "10",
            "-aet",
            "FINDSCU",
            "-aec",
            node.ae_title,
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID",
            "127.0.0.1",
            str(node.port),
        ],
        timeout=60,
    )
    assert find.returncode != 0, _output(find)
    output = find.stdout + find.stderr
    assert "Abstract Syntax Not Supported" in output, _output(find)
    assert "No Acceptable Presentation Contexts" in output, _output(find)

    assert node.is_running()
    assert node.echo().returncode == 0
    records = [a for a in node.settled_associations() if a["calling_ae_title"] == "FINDSCU"]
    assert len(records) == 1 and records[0]["outcome"] in ("released", "aborted"), records
    assert records[0]["instances_stored"] == 0
    assert "Traceback" not in node.log_text()

    pushed = node.storescu(small_series.paths[:2])
    assert pushed.returncode == 0, _output(pushed)
    node.wait_for_study(small_series.study_uid, state="complete", instances=2)


def test_released_association_is_recorded_as_released(node_process: Any) -> None:
    """Regression: the outcome was read before the acceptor thread had set is_released."""
    node = node_process()
    for _ in range(5):
        assert node.echo(calling_ae="RELEASER").returncode == 0
    outcomes = [a["outcome"] for a in node.settled_associations() if a["calling_ae_title"] == "RELEASER"]
    assert outcomes == ["released"] * 5


# -- compressed transfer syntaxes made with DCMTK -------------------------------------

#: name -> (DCMTK command, transfer syntax it writes, lossless?)
COMPRESSIONS: dict[str, tuple[list[str], str, bool]] = {
    "jpeg-baseline-8bit": (["dcmcjpeg", "+eb"], "1.2.840.10008.1.2.4.50", False),
    "jpeg-extended-12bit": (["dcmcjpeg", "+ee"], "1.2.840.10008.1.2.4.51", False),
    "jpeg-lossless-process14": (["dcmcjpeg", "+el"], "1.2.840.10008.1.2.4.57", True),
    "jpeg-lossless-sv1": (["dcmcjpeg", "+e1"], "1.2.840.10008.1.2.4.70", True),
    "jpeg-ls-lossless": (["dcmcjpls", "+el"], "1.2.840.10008.1.2.4.80", True),
    "jpeg-ls-near-lossless": (["dcmcjpls", "+en"], "1.2.840.10008.1.2.4.81", False),
    "rle-lossless": (["dcmcrle"], "1.2.840.10008.1.2.5", True),
}

#: A storescu configuration that proposes CT Image Storage with each of these syntaxes
#: only (storescu otherwise proposes uncompressed syntaxes and decompresses to them).
STORESCU_PROFILE = "COMPRESSED"


def _storescu_config() -> str:
    syntaxes = sorted({syntax for _, syntax, _ in COMPRESSIONS.values()})
    lines = ["[[TransferSyntaxes]]"]
    for index, syntax in enumerate(syntaxes):
        lines += [f"[TS{index}]", f"TransferSyntax1 = {syntax}"]
    lines += ["[[PresentationContexts]]", "[CompressedCT]"]
    for index, _ in enumerate(syntaxes):
        lines.append(f"PresentationContext{index + 1} = {CT_IMAGE_STORAGE}\\TS{index}")
    lines += ["[[Profiles]]", f"[{STORESCU_PROFILE}]", "PresentationContexts = CompressedCT"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def compressed_files(
    small_series: GeneratedSeries, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """name -> (compressed file, its uncompressed source); each from a different slice."""
    out = tmp_path_factory.mktemp("compressed")
    files: dict[str, tuple[Path, Path]] = {}
    for index, (name, (command, syntax, _)) in enumerate(COMPRESSIONS.items()):
        source = small_series.paths[index]
        target = out / f"{name}.dcm"
        result = run_tool([*command, str(source), str(target)])
        assert result.returncode == 0, f"{command}: {_output(result)}"
        assert pydicom.dcmread(target, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
        files[name] = (target, source)
    return files


@pytest.fixture(scope="module")
def compressed_node(tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("compressed_node")
    node = NodeProcess(work, label="compressed-node")
    node.start()
    (work / "storescu.cfg").write_text(_storescu_config())
    yield node
    node.close()


@pytest.mark.parametrize("name", list(COMPRESSIONS))
def test_compressed_instance_is_stored_as_sent(
    name: str, compressed_node: NodeProcess, compressed_files: dict[str, tuple[Path, Path]]
) -> None:
    node = compressed_node
    sent, source = compressed_files[name]
    _, syntax, lossless = COMPRESSIONS[name]
    sent_ds = pydicom.dcmread(sent)
    sop_uid = str(sent_ds.SOPInstanceUID)

    pushed = node.storescu([sent], "-xf", str(node.work_dir / "storescu.cfg"), STORESCU_PROFILE)
    assert pushed.returncode == 0, _output(pushed)

    rows = [row for row in node.instances() if row["sop_instance_uid"] == sop_uid]
    assert len(rows) == 1, f"{sop_uid} not indexed: {node.instances()}"
    row = rows[0]
    assert row["transfer_syntax_uid"] == syntax, "indexed under another transfer syntax: transcoded?"
    stored_path = node.spool_file(row["path"])
    stored_bytes = stored_path.read_bytes()
    assert len(stored_bytes) == row["size_bytes"]

    stored_meta, stored_dataset = split_part10(stored_bytes)
    _, sent_dataset = split_part10(sent.read_bytes())
    stored = pydicom.dcmread(stored_path)
    assert stored.file_meta.TransferSyntaxUID == syntax, "stored file meta names another transfer syntax"
    assert stored.file_meta.MediaStorageSOPInstanceUID == sop_uid
    assert stored.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
    assert stored.file_meta.SourceApplicationEntityTitle.strip() == "STORESCU"
    assert stored_meta  # the node wrote its own file meta group
    assert stored_dataset == sent_dataset, "the stored dataset differs from the bytes storescu sent"
    assert stored.PixelData == sent_ds.PixelData

    # The stored file still decodes, to exactly the source pixels when the codec is lossless.
    decoded = stored.pixel_array
    assert decoded.shape == (sent_ds.Rows, sent_ds.Columns)
    if lossless:
        np.testing.assert_array_equal(decoded, pydicom.dcmread(source).pixel_array)
