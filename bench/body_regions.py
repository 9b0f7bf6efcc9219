"""Body-region survey benchmark: what the image check decides on every volume we have, and its cost.

For each volume it prints the regions the survey (``workers.body_regions``) decided, which
are complete (landmark organ wholly in the field of view), the truth, the survey's time
(the median of ``--repeat`` runs, one thread: wall-clock ms, and CPU ms of this process, which
other work on the machine does not inflate) and the 1-minute load average when it ran:

* chest phantoms (``training.phantoms.chest``) through DICOM, at several grids and fields of
  view (default grid for ``--seeds`` seeds; coarse; a short scan range and an in-plane crop
  that cut the lungs; air around; upsampled to 300x512x512 for the timing that matters);
* the real InVesalius head CT (``invesalius-examples``), whole and cut at either end;
* the same volumes re-acquired feet-first, sagittal and coronal (same answer expected);
* crude synthetic anatomy (two thighs; head on a neck on a chest phantom; that upper body on an
  abdomen, a pelvis and thighs);
* a constant volume, a non-CT, and pydicom's own test files (single-slice CT, MR, an
  enhanced multi-frame CT when ``--pydicom-data`` points at pydicom-data's files);
* ``--atlas PATH``: TotalSegmentator's 1 mm CT brain template (a skull-stripped brain on a 0 HU
  background), read with nibabel when it is importable.

    python bench/body_regions.py [--repeat 3] [--seeds 5] [--atlas ct_brain_atlas_1mm.nii.gz]
                                 [--pydicom-data DIR] [--evidence] [--margin-seeds 20]

Why: the check runs before every model; it must be right on what we have and cost well
under a second on a full-size CT (the aim: under 0.3 s on one core).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.unit.workers.body_region_volumes import (  # noqa: E402
    chest_phantom,
    chest_volume,
    cropped,
    head_neck_chest_volume,
    head_volume,
    legs_volume,
    padded_with_air,
    reoriented,
    volume_from_array,
    whole_body_volume,
    with_modality,
)
from workers.body_regions import survey_body_regions  # noqa: E402
from workers.volume import Volume, VolumeError, load_series  # noqa: E402

Case = tuple[str, str, Callable[[], Volume]]


def cases(work: Path, seeds: int, atlas: Path | None, pydicom_data: Path | None) -> Iterator[Case]:
    """(name, truth, volume maker) of every volume, built lazily."""
    memo: dict[str, Volume] = {}

    def chest(seed: int) -> Volume:
        key = f"chest{seed}"
        if key not in memo:
            memo[key] = chest_volume(chest_phantom((96, 160, 160), (2.5, 2.2, 2.2), seed), work / key, seed)
        return memo[key]

    def head() -> Volume:
        if "head" not in memo:
            memo["head"] = head_volume(work / "head")
        return memo["head"]

    for seed in range(seeds):
        yield (f"chest phantom 96x160x160 @2.5/2.2 mm, seed {seed}", "chest, complete", lambda s=seed: chest(s))
    yield ("chest phantom 24x64x64 @10/5.5 mm", "chest, complete",
           lambda: chest_volume(chest_phantom((24, 64, 64), (10.0, 5.5, 5.5), 11), work / "coarse", 11))
    yield ("chest phantom 60x128x128 @4/2.6 mm", "chest, complete",
           lambda: chest_volume(chest_phantom((60, 128, 128), (4.0, 2.6, 2.6), 12), work / "mid", 12))
    yield ("chest phantom upsampled to 300x512x512 @0.8/0.69 mm", "chest, complete", lambda: upsampled(chest(0)))
    yield ("chest phantom, slices 30-69 only (lungs cut)", "chest, incomplete",
           lambda: cropped(chest(0), (slice(30, 70), slice(None), slice(None))))
    yield ("chest phantom, slices 0-59 (apices cut)", "chest, incomplete",
           lambda: cropped(chest(0), (slice(0, 60), slice(None), slice(None))))
    yield ("chest phantom, columns 40-159 (right lung cut in-plane)", "chest, incomplete",
           lambda: cropped(chest(0), (slice(None), slice(None), slice(40, 160))))
    yield ("chest phantom in 2x the field of view (air around)", "chest, complete",
           lambda: padded_with_air(chest(0), 80, levels=10))
    yield ("chest phantom feet-first", "chest, complete", lambda: reoriented(chest(0), (0, 1, 2), (True, False, False)))
    yield ("chest phantom as sagittal acquisition", "chest, complete", lambda: reoriented(chest(0), (2, 0, 1)))
    yield ("chest phantom as coronal acquisition, reversed", "chest, complete",
           lambda: reoriented(chest(0), (1, 0, 2), (True, True, False)))
    yield ("head CT (InVesalius, 108x256x256 @1.5/0.96 mm)", "head, complete", head)
    yield ("head CT, top 30 slices removed (vertex cut)", "head, incomplete",
           lambda: cropped(head(), (slice(0, 78), slice(None), slice(None))))
    yield ("head CT, bottom 25 slices removed (skull base cut)", "head, incomplete",
           lambda: cropped(head(), (slice(25, 108), slice(None), slice(None))))
    yield ("head CT feet-first", "head, complete", lambda: reoriented(head(), (0, 1, 2), (True, False, False)))
    yield ("head CT as sagittal acquisition", "head, complete", lambda: reoriented(head(), (2, 0, 1)))
    yield ("head CT in 2x the field of view (air around)", "head, complete", lambda: padded_with_air(head(), 128))
    yield ("synthetic: head CT on a neck on a chest phantom", "head, neck, chest (complete)",
           lambda: head_neck_chest_volume(head(), chest_phantom((96, 160, 160), (2.5, 2.2, 2.2), 0)))
    yield ("synthetic: thighs, pelvis, abdomen, chest phantom, neck, head CT", "every region, whole_body",
           lambda: whole_body_volume(head(), chest_phantom((96, 160, 160), (2.5, 2.2, 2.2), 0)))
    yield ("synthetic: two thighs, no trunk", "extremities", legs_volume)
    yield ("constant 0 HU volume 40x64x64", "nothing", lambda: volume_from_array(np.zeros((40, 64, 64)), (5, 5, 5)))
    yield ("air only (-1000 HU) 40x64x64", "nothing",
           lambda: volume_from_array(np.full((40, 64, 64), -1000.0), (5, 5, 5)))
    yield ("tiny 3x8x8 CT", "not judged (too small)", lambda: volume_from_array(np.zeros((3, 8, 8)), (5, 5, 5)))
    yield ("chest phantom labelled MR", "not judged (not CT)", lambda: with_modality(chest(0), "MR"))
    for name in ("CT_small.dcm", "MR_small.dcm"):
        yield (f"pydicom {name} (one slice)", "not judged", lambda n=name: pydicom_file(n))
    if pydicom_data is not None:
        for name in ("eCT_Supplemental.dcm", "emri_small.dcm", "693_UNCR.dcm"):
            if (pydicom_data / name).is_file():
                yield (f"pydicom-data {name}", "not judged", lambda n=name: load_series([pydicom_data / n]))
    if atlas is not None:
        yield ("TotalSegmentator CT brain atlas (skull-stripped, 0 HU around)", "no skull, no lungs",
               lambda: atlas_volume(atlas, background=None))
        yield ("the same atlas with air (-1000 HU) around", "no skull, no lungs",
               lambda: atlas_volume(atlas, background=-1000.0))


def upsampled(volume: Volume) -> Volume:
    """``volume`` on a 300x512x512 grid (nearest neighbour), the size of a real thin-slice chest CT."""
    shape = volume.array.shape
    index = [np.minimum((np.arange(n) * shape[a] / n).astype(int), shape[a] - 1)
             for a, n in enumerate((300, 512, 512))]
    array = volume.array[np.ix_(*index)]
    spacing = [volume.spacing_mm[a] * shape[a] / n for a, n in enumerate((300, 512, 512))]
    return volume_from_array(array, spacing, axes=volume.axes, origin_mm=volume.origin_mm)


def pydicom_file(name: str) -> Volume:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        raise FileNotFoundError(f"pydicom test file {name} not found")
    return load_series([path])


def atlas_volume(path: Path, background: float | None) -> Volume:
    """The NIfTI template as an axial head-first volume (RAS voxel axes turned into LPS index axes)."""
    import nibabel

    image = nibabel.load(str(path))
    data = np.asarray(image.dataobj, dtype=np.float32)  # (x, y, z), RAS+
    if background is not None:
        data = np.where(data == 0, background, data)
    array = np.transpose(data, (2, 1, 0))  # (z, y, x)
    zooms = image.header.get_zooms()
    axes = np.array([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [-1.0, 0.0, 0.0]])  # +y anterior, +x right in LPS
    return volume_from_array(array, (float(zooms[2]), float(zooms[1]), float(zooms[0])), axes=axes)


def describe(volume: Volume, repeat: int) -> tuple[str, str, float, float, str]:
    """(regions decided, completeness, median wall seconds, median CPU seconds, notes) of ``repeat`` surveys.

    CPU seconds (this process) say what the survey costs one core, whatever else the machine runs.
    """
    times, cpu = [], []
    for _ in range(repeat):
        started = time.process_time()
        survey = survey_body_regions(volume)
        cpu.append(time.process_time() - started)
        times.append(survey.seconds)
    notes = "; ".join(survey.notes)
    wall, used = statistics.median(times), statistics.median(cpu)
    if not survey.available:
        return "not judged", "-", wall, used, notes
    regions = ", ".join(r.region for r in survey.regions) or "none"
    complete = ", ".join(f"{r.region} {'yes' if r.complete else 'no'}" for r in survey.regions
                         if r.complete is not None) or "-"
    return regions, complete, wall, used, notes


def phantom_margins(seeds: int) -> None:
    """Whether the default training phantom shows both lungs wholly in the field of view, per seed:
    the lungs' extent in the label map against the grid, and the survey's verdict."""
    from training.phantoms.chest import LUNG, NODULE, PhantomConfig, generate_chest_phantom

    print(f"\ndefault chest phantom {PhantomConfig().shape} @ {PhantomConfig().spacing_mm} mm, {seeds} seeds: "
          "lung margins from the label map (slices below / above, columns left / right, rows front / back)")
    for seed in range(seeds):
        phantom = generate_chest_phantom(PhantomConfig(), seed=seed)
        lung = (phantom.labels == LUNG) | (phantom.labels == NODULE)
        nz, ny, nx = lung.shape
        z, y, x = (np.nonzero(lung.any(axis=axes))[0] for axes in ((1, 2), (0, 2), (0, 1)))
        survey = survey_body_regions(volume_from_array(phantom.volume_hu, phantom.spacing_mm))
        chest = survey.region("chest")
        print(f"  seed {seed:2d}: z {z[0]} / {nz - 1 - z[-1]}, x {x[0]} / {nx - 1 - x[-1]}, "
              f"y {y[0]} / {ny - 1 - y[-1]}; "
              f"survey: {'chest complete' if chest and chest.complete else chest.evidence if chest else 'no chest'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeat", type=int, default=3, help="survey runs per volume (the median is shown)")
    parser.add_argument("--seeds", type=int, default=5, help="default-grid chest phantoms")
    parser.add_argument("--atlas", type=Path, help="TotalSegmentator's ct_brain_atlas_1mm.nii.gz")
    parser.add_argument("--pydicom-data", type=Path, help="the data folder of the pydicom-data package")
    parser.add_argument("--evidence", action="store_true", help="also print each region's evidence")
    parser.add_argument("--margin-seeds", type=int, default=0,
                        help="also check the default training phantom's lung margins over this many seeds")
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; {os.cpu_count()} CPUs")
    print(f"{'volume':<62} | {'truth':<28} | {'regions decided':<24} | {'complete':<18} | {'ms':>6} | {'cpu ms':>6} | load | notes")
    with tempfile.TemporaryDirectory(prefix="bench-body-regions-") as tmp:
        for name, truth, make in cases(Path(tmp), args.seeds, args.atlas, args.pydicom_data):
            try:
                volume = make()
            except (OSError, VolumeError, ValueError, ImportError) as exc:
                print(f"{name:<62} | {truth:<28} | cannot load: {type(exc).__name__}: {exc}")
                continue
            regions, complete, seconds, cpu, notes = describe(volume, args.repeat)
            print(f"{name:<62} | {truth:<28} | {regions:<24} | {complete:<18} | {seconds * 1000:6.0f} | "
                  f"{cpu * 1000:6.0f} | {os.getloadavg()[0]:.2f}" + (f" | {notes}" if notes else ""))
            if args.evidence:
                survey = survey_body_regions(volume)
                for line in survey.image_regions().evidence:
                    print(f"    {line}")
    if args.margin_seeds:
        phantom_margins(args.margin_seeds)


if __name__ == "__main__":
    main()
