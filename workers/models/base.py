"""What every model the workers run looks like, whatever its format.

Why: the pipeline must not care whether a model is a MONAI bundle, a TorchScript
file or something else; it calls :meth:`Model.predict` on a :class:`Volume` and
gets one of the result types below: a label map in the volume's own voxel grid
(segmentation), findings in patient coordinates (detection), or class
probabilities for the whole series with an optional explanation map on the
volume's grid (classification).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from dicom_node.contracts import AlgorithmInfo, Detection, SegmentLabel
from dicom_node.model_catalog import ModelKind
from workers.volume import Volume

__all__ = ["ClassificationResult", "DetectionResult", "LabelledModel", "Model", "ModelKind", "SegmentationResult"]


@dataclass(frozen=True, eq=False)
class SegmentationResult:
    """A label map on the source volume's grid (uint8, same shape as ``Volume.array``, C-contiguous) and its labels.

    The label map is made C-contiguous when it is not (a copy; a loader should give it so): the
    result builders walk it slice by slice, frame by frame, and a transposed view read that way
    made encoding a 300-slice segmentation about four times slower.

    ``low_confidence_fraction``: the out-of-distribution signal, where the loader can
    compute it cheaply: of the voxels the network labelled foreground (its argmax is not
    background), the fraction whose winning softmax probability is below 0.5, i.e. the
    network preferred that label but was not sure of it. Counted on the network's own
    grid (after its resampling, before the result is brought back to the volume's grid);
    0.0 when nothing was labelled; None when the model gives no softmax probabilities or
    has only one foreground label (the winner of two classes always has >= 0.5).
    """

    label_map: npt.NDArray[np.uint8]
    labels: tuple[SegmentLabel, ...]
    low_confidence_fraction: float | None = None

    def __post_init__(self) -> None:
        """Hold the label map in C order (see the class docstring); an array already in C order is kept as it is."""
        if isinstance(self.label_map, np.ndarray) and not self.label_map.flags.c_contiguous:
            object.__setattr__(self, "label_map", np.ascontiguousarray(self.label_map))


@dataclass(frozen=True)
class DetectionResult:
    """Findings in patient coordinates (LPS mm), best first; empty when nothing was found."""

    detections: tuple[Detection, ...]


@dataclass(frozen=True, eq=False)
class ClassificationResult:
    """A series-level classification: one probability per class, the winner, and optionally where it looked.

    ``labels``: the classes, in label-value order; each one's ``property_type`` is the class's
    coded value (e.g. SCT 52101004 "Present") and its ``property_category`` the question the
    model answers (e.g. SCT 27925004 "Nodule"), the same for every class. ``probabilities``:
    one per label, same order, each in [0, 1], summing to 1 (a softmax). ``explanation``: a
    float32 map on the volume's ``[slice, row, column]`` grid, values in [0, 1], of where the
    evidence for the winning class lies (``explanation_method`` says how it was computed:
    ``"grad-cam"``, ``"hirescam"`` or ``"occlusion"``); None when the model computes none.
    """

    labels: tuple[SegmentLabel, ...]
    probabilities: tuple[float, ...]
    explanation: npt.NDArray[np.float32] | None = None
    explanation_method: str | None = None

    def __post_init__(self) -> None:
        """Reject results that could not be reported: mismatched lengths, probabilities that are not a distribution."""
        if len(self.labels) < 2 or len(self.labels) != len(self.probabilities):
            raise ValueError(f"classification result: {len(self.labels)} labels and {len(self.probabilities)} "
                             "probabilities (need the same number, at least 2)")
        if any(not 0.0 <= p <= 1.0 for p in self.probabilities) or abs(sum(self.probabilities) - 1.0) > 1e-3:
            raise ValueError(f"classification result: probabilities {self.probabilities} are not a distribution")
        if self.explanation is not None:
            if self.explanation.ndim != 3 or self.explanation.dtype != np.float32:
                raise ValueError(f"classification result: explanation must be a 3-D float32 array, got "
                                 f"{self.explanation.dtype} {self.explanation.shape}")
            if self.explanation.size and (self.explanation.min() < 0.0 or self.explanation.max() > 1.0):
                raise ValueError("classification result: explanation values must lie in [0, 1]")

    @property
    def winner_index(self) -> int:
        """Position of the most probable class in ``labels``."""
        return int(np.argmax(self.probabilities))

    @property
    def winner(self) -> SegmentLabel:
        """The most probable class."""
        return self.labels[self.winner_index]

    @property
    def winner_probability(self) -> float:
        """The most probable class's probability."""
        return float(self.probabilities[self.winner_index])


class LabelledModel:
    """What every loader shares: the algorithm identity and the ``{value: label}`` mapping set when loaded."""

    _algorithm: AlgorithmInfo
    _mapping: Mapping[int, SegmentLabel]

    @property
    def algorithm(self) -> AlgorithmInfo:
        return self._algorithm

    @property
    def labels(self) -> tuple[SegmentLabel, ...]:
        return tuple(sorted(self._mapping.values(), key=lambda label: label.value))


@runtime_checkable
class Model(Protocol):
    """A loaded model, ready to run; loaded once per worker process and reused."""

    @property
    def kind(self) -> ModelKind: ...

    @property
    def algorithm(self) -> AlgorithmInfo: ...

    @property
    def labels(self) -> tuple[SegmentLabel, ...]: ...

    def predict(self, volume: Volume) -> SegmentationResult | DetectionResult | ClassificationResult: ...
