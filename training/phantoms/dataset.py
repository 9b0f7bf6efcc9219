"""Write a complete synthetic chest CT dataset in every format we support.

Why: one call (behind ``dicom-node phantom --out DIR --cases N [--seed S]``)
gives a training / test dataset that the segmentation tools (Decathlon
layout), the detection tools (MONAI box list) and the DICOM path (CT series +
SEG per case) all read, with identical content in each format.

Layout::

    out_dir/
      dataset.json, imagesTr/, labelsTr/     Decathlon (training.data.decathlon)
      boxes.json                             box list (training.data.boxes)
      dicom/<case>/series/IM#####.dcm        when dicom=True
      dicom/<case>/seg.dcm

Case ``i`` is ``chest_{i:04d}``, generated from seed ``seed + i``; each case
is generated and written by one process at a time (``workers`` of them), so
memory grows with ``workers``, not with ``cases``.
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from training.data.boxes import BoxEntry, nodule_box_entry, write_box_list
from training.data.decathlon import split_names, write_dataset_json, write_decathlon_case
from training.phantoms.chest import PhantomConfig, generate_chest_phantom

__all__ = ["case_name", "write_phantom_dataset"]


def case_name(index: int) -> str:
    """Name of case ``index`` in every format (file stem and DICOM folder)."""
    return f"chest_{index:04d}"


def write_phantom_dataset(
    out_dir: str | Path,
    cases: int,
    seed: int,
    config: PhantomConfig | None = None,
    dicom: bool = True,
    *,
    validation_fraction: float = 0.0,
    workers: int = 1,
) -> Path:
    """Generate ``cases`` phantoms and write them in all formats; returns ``out_dir``.

    All cases are Decathlon training cases; the last
    ``round(cases * validation_fraction)`` are listed under "validation" (the
    rest under "training") in boxes.json, whose image paths are relative to
    ``out_dir``. ``workers`` processes generate cases side by side (a fine grid
    takes ~10 s per case); the output does not depend on it. Prints nothing.
    """
    if cases < 1:
        raise ValueError(f"cases must be >= 1, got {cases}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    cfg = config or PhantomConfig()
    names = [case_name(i) for i in range(cases)]
    training_names, validation_names = split_names(names, validation_fraction)
    validation_set = set(validation_names)
    splits: dict[str, list[BoxEntry]] = {"training": [], "validation": []}
    jobs = [(root, name, cfg, seed + i, dicom) for i, name in enumerate(names)]
    if workers == 1:
        entries = [_write_case(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=min(workers, cases)) as pool:
            entries = list(pool.map(_write_case, *zip(*jobs)))
    for name, entry in zip(names, entries):
        splits["validation" if name in validation_set else "training"].append(entry)
    write_dataset_json(root, names)
    write_box_list(root / "boxes.json", splits)
    return root


def _write_case(root: Path, name: str, config: PhantomConfig, seed: int, dicom: bool) -> BoxEntry:
    """Generate one phantom, write it in every format; its box list entry."""
    phantom = generate_chest_phantom(config, seed=seed)
    write_decathlon_case(root, name, phantom)
    if dicom:
        from training.data.dicom_pair import write_dicom_case  # highdicom only when needed

        write_dicom_case(phantom, root / "dicom" / name, seed=seed)
    return nodule_box_entry(f"imagesTr/{name}.nii.gz", phantom.nodules)
