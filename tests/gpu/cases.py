"""What the GPU tests (tests/gpu) and the GPU benchmark (bench/gpu.py) share: the shipped models, the
300-slice CT they run on, how a model is run on a device with what the workers set, and how the results of
two runs are compared.

Why one module: the benchmark reports the figures the tests check, on the same CT and models, so that a
figure in the docs and a passing test mean the same thing.

Nothing here needs a GPU: on the CPU every function runs (the comparisons are plain numpy), which is how
the CPU-only CI checks this module (tests/unit/workers/test_gpu_cases.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from dicom_node.model_catalog import PACKAGE_SCHEME, ModelEntry, demo_entries, read_bundle_json
from training.classification.nodule_presence import phantom_volume
from training.phantoms.chest import PhantomConfig, generate_chest_phantom
from workers.models.base import ClassificationResult, DetectionResult, Model, SegmentationResult
from workers.models.loading import use_cudnn_benchmark
from workers.models.registry import ModelRegistry
from workers.volume import Volume

#: The classifier shipped in workers/bundles but not served by default (config/models.yaml has it commented out).
NODULE_PRESENCE = ModelEntry(id="nodule-presence", kind="classification", format="monai_bundle",
                             path=f"{PACKAGE_SCHEME}workers/bundles/nodule_presence_classification", version="0.1.0")
#: Every shipped model, in the order the tests and the benchmark run them.
MODEL_IDS = [entry.id for entry in (*demo_entries(), NODULE_PRESENCE)]
#: A thin-slice chest CT: 300 slices of 512 x 512 at 1.0 x 0.7 x 0.7 mm (bench/memory.py's 300-slice case).
CT_SHAPE = (300, 512, 512)
CT_SPACING_MM = (1.0, 0.7, 0.7)

#: Labels of at least this many voxels (on the CPU) must agree with Dice >= ORGAN_DICE; smaller ones (nodules)
#: with Dice >= SMALL_LABEL_DICE once they have SMALL_LABEL_MIN_VOXELS. Float16 moves only voxels at a boundary.
ORGAN_VOXELS, ORGAN_DICE = 10_000, 0.98
SMALL_LABEL_MIN_VOXELS, SMALL_LABEL_DICE = 200, 0.85
#: All voxels of the label map: at least this fraction the same on both devices.
VOXEL_AGREEMENT = 0.998
#: Detections match when their centres are this close (mm) and their scores differ by at most SCORE_TOLERANCE;
#: a detection within SCORE_TOLERANCE of the model's reporting threshold may be missing on the other device.
CENTRE_TOLERANCE_MM, SCORE_TOLERANCE = 2.0, 0.05
PROBABILITY_TOLERANCE = 0.02
#: Device memory a model may hold at its peak on the 300-slice CT, warmed up (torch.cuda.max_memory_allocated):
#: with room to spare, so that these models share a 16 GB card with each other and a second worker.
DEVICE_MEMORY_BOUND_MIB = {"chest-ct-segmentation": 4096, "lung-nodule-detection": 4096, "nodule-presence": 2048}


def shipped_registry() -> ModelRegistry:
    """Every model shipped in workers/bundles: the two demo models the node serves and the classifier."""
    demo = ModelRegistry.demo()
    return ModelRegistry((*demo_entries(), NODULE_PRESENCE), base_dir=demo.base_dir, source="shipped models")


def chest_ct(seed: int = 2024, shape: tuple[int, int, int] = CT_SHAPE) -> Volume:
    """A chest CT phantom with 2-3 nodules of 8-20 mm as a workers :class:`Volume` (axial, LPS), no files."""
    slices = shape[0]
    config = PhantomConfig(shape=shape, spacing_mm=(CT_SPACING_MM[0] * CT_SHAPE[0] / slices, *CT_SPACING_MM[1:]),
                           nodule_count=(2, 3), nodule_diameter_mm=(8.0, 20.0))
    return phantom_volume(generate_chest_phantom(config, seed=seed), uid=f"2.25.{9000 + seed}")


@dataclass
class Timed:
    """One run of ``predict``: its result, wall seconds (the device synchronised) and peak device memory."""

    result: Any
    seconds: float
    peak_mib: float | None = None
    dtypes: set[str] = field(default_factory=set)


@contextmanager
def recording_dtypes() -> Iterator[set[str]]:
    """The dtypes of the outputs of every convolution run inside (AMP shows as float16)."""
    found: set[str] = set()

    def hook(module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(module, torch.nn.modules.conv._ConvNd) and isinstance(output, torch.Tensor):
            found.add(str(output.dtype).removeprefix("torch."))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield found
    finally:
        handle.remove()


def timed_predict(model: Model, volume: Volume) -> Timed:
    """``model.predict(volume)``, timed to the end of its device work, with its peak device memory on CUDA."""
    cuda = torch.cuda.is_available() and str(getattr(model, "device", "cpu")).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with recording_dtypes() as dtypes:
        started = time.perf_counter()
        result = model.predict(volume)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return Timed(result, seconds, peak, dtypes)


def load(registry: ModelRegistry, model_id: str, device: str, cudnn_benchmark: bool = True) -> Model:
    """``model_id`` on ``device`` as a worker loads it: cuDNN benchmark mode as ``worker.cudnn_benchmark`` sets
    it, AMP as the loader chooses for the device."""
    use_cudnn_benchmark(cudnn_benchmark)
    return registry.load(model_id, device=device)


# -- comparing two runs -----------------------------------------------------------------


def label_differences(reference: npt.NDArray[np.integer], other: npt.NDArray[np.integer]) -> list[str]:
    """What differs beyond tolerance between two label maps of one volume (empty: they agree)."""
    if reference.shape != other.shape:
        return [f"label maps of shapes {reference.shape} and {other.shape}"]
    problems = []
    agreement = float(np.mean(reference == other))
    if agreement < VOXEL_AGREEMENT:
        problems.append(f"{agreement:.5f} of the voxels agree (at least {VOXEL_AGREEMENT} expected)")
    for value in sorted(int(v) for v in np.unique(np.concatenate([np.unique(reference), np.unique(other)])) if v):
        a, b = reference == value, other == value
        size = int(a.sum())
        dice = 2.0 * float(np.logical_and(a, b).sum()) / max(1, size + int(b.sum()))
        wanted = ORGAN_DICE if size >= ORGAN_VOXELS else SMALL_LABEL_DICE if size >= SMALL_LABEL_MIN_VOXELS else None
        if wanted is not None and dice < wanted:
            problems.append(f"label {value}: Dice {dice:.4f} < {wanted} ({size} voxels on the reference, "
                            f"{int(b.sum())} on the other)")
    return problems


def detection_differences(reference: DetectionResult, other: DetectionResult, threshold: float) -> list[str]:
    """Detections of one run without a partner in the other (centre within CENTRE_TOLERANCE_MM, score within
    SCORE_TOLERANCE), except those that close to the reporting ``threshold``."""
    problems = []
    for name, mine, theirs in (("reference", reference, other), ("other", other, reference)):
        for found in mine.detections:
            partner = [d for d in theirs.detections
                       if np.linalg.norm(np.subtract(d.centre_mm, found.centre_mm)) <= CENTRE_TOLERANCE_MM]
            if any(abs(d.score - found.score) <= SCORE_TOLERANCE for d in partner):
                continue
            if found.score < threshold + SCORE_TOLERANCE:
                continue  # may fall below the threshold on the other device
            closest = min((float(np.linalg.norm(np.subtract(d.centre_mm, found.centre_mm))) for d in
                           theirs.detections), default=float("inf"))
            problems.append(f"{name} detection at {tuple(round(v, 1) for v in found.centre_mm)} score "
                            f"{found.score:.3f}: no partner (closest centre {closest:.1f} mm, scores "
                            f"{[round(d.score, 3) for d in partner]})")
    return problems


def classification_differences(reference: ClassificationResult, other: ClassificationResult) -> list[str]:
    """Different winning class, or a probability that moved more than PROBABILITY_TOLERANCE."""
    problems = []
    if np.argmax(reference.probabilities) != np.argmax(other.probabilities):
        problems.append(f"winning class differs: {reference.probabilities} vs {other.probabilities}")
    moved = max(abs(a - b) for a, b in zip(reference.probabilities, other.probabilities))
    if moved > PROBABILITY_TOLERANCE:
        problems.append(f"probabilities {reference.probabilities} vs {other.probabilities} (moved {moved:.4f})")
    return problems


def result_differences(reference: Any, other: Any, threshold: float = 0.0) -> list[str]:
    """The differences of two results of the same model (segmentation, detection or classification)."""
    if isinstance(reference, SegmentationResult):
        return label_differences(reference.label_map, other.label_map)
    if isinstance(reference, DetectionResult):
        return detection_differences(reference, other, threshold)
    if isinstance(reference, ClassificationResult):
        return classification_differences(reference, other)
    raise TypeError(f"no comparison for a {type(reference).__name__}")


def detection_threshold(registry: ModelRegistry, model_id: str) -> float:
    """The score under which a CenterNet detector reports nothing (its bundle's ``detection.score_threshold``)."""
    return float(read_bundle_json(registry.path(model_id), "inference.json").get("detection", {})
                 .get("score_threshold", 0.0))
