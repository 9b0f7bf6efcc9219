"""What every model the workers run looks like, whatever its format.

Why: the pipeline must not care whether a model is a MONAI bundle, a TorchScript
file or something else; it calls :meth:`Model.predict` on a :class:`Volume` and
gets one of the two result types below, in the volume's own voxel grid
(segmentation) or in patient coordinates (detection).
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

__all__ = ["DetectionResult", "LabelledModel", "Model", "ModelKind", "SegmentationResult"]


@dataclass(frozen=True, eq=False)
class SegmentationResult:
    """A label map on the source volume's grid (uint8, same shape as ``Volume.array``) and its labels.

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


@dataclass(frozen=True)
class DetectionResult:
    """Findings in patient coordinates (LPS mm), best first; empty when nothing was found."""

    detections: tuple[Detection, ...]


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

    def predict(self, volume: Volume) -> SegmentationResult | DetectionResult: ...
