"""Serve a TorchScript segmentation network (a ``.ts`` file) as a :class:`~workers.models.base.Model`.

Why: a TorchScript file runs without the Python code that defined the network
(MONAI bundles ship one as ``models/model.ts``; other tools export them too), but
it carries no preprocessing. The registry entry gives that explicitly
(:class:`~dicom_node.model_catalog.TorchScriptPreprocessing`, validated with the
registry: target spacing, HU window, sliding-window size) and this module builds
the standard MONAI chain from it - RAS orientation, resampling, intensity window
scaled to 0..1, sliding-window inference, softmax, argmax, inversion back to the
input grid - and runs it with the same
:class:`~workers.models.monai_bundle.InferencePipeline` as MONAI bundles. The
network's output is softmaxed, so results carry ``low_confidence_fraction``
(:func:`~workers.models.monai_bundle.low_confidence_fraction`, from the logits on the
network's grid).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from dicom_node.contracts import SegmentLabel
from dicom_node.model_catalog import BundleError, TorchScriptPreprocessing
from workers.models.loading import file_algorithm, load_torchscript, resolve_device
from workers.models.monai_bundle import InferencePipeline, SegmentationPipelineModel, applies_softmax

__all__ = ["TorchScriptPreprocessing", "TorchScriptSegmentationModel", "check_file_and_labels", "pipeline_transforms",
           "sliding_window_pipeline"]

logger = logging.getLogger(__name__)


def check_file_and_labels(path: Path, labels: Mapping[int, SegmentLabel], source: str) -> None:
    """What a single-file model (TorchScript, ONNX) needs before it loads: the file, and labels that do not
    map output value 0 (background). Raises BundleError naming ``source`` and the problem."""
    if not path.is_file():
        raise BundleError(f"{source}: no such file")
    if not labels:
        raise BundleError(f"{source}: no labels given")
    if 0 in labels:
        raise BundleError(f"{source}: label {labels[0].name!r} maps output value 0, which is background")


def pipeline_transforms(pre: TorchScriptPreprocessing, image_key: str, pred_key: str) -> tuple[Any, Any]:
    """(preprocessing, postprocessing) MONAI Composes for ``pre``: the layout of the project's bundles."""
    from monai.transforms import (
        Activationsd,
        AsDiscreted,
        Compose,
        EnsureTyped,
        Invertd,
        Orientationd,
        ScaleIntensityRanged,
        Spacingd,
    )

    preprocessing = Compose([
        Orientationd(keys=image_key, axcodes="RAS"),
        Spacingd(keys=image_key, pixdim=list(pre.spacing_mm), mode="bilinear"),
        ScaleIntensityRanged(
            keys=image_key, a_min=pre.window_hu[0], a_max=pre.window_hu[1], b_min=0.0, b_max=1.0, clip=True
        ),
        EnsureTyped(keys=image_key),
    ])
    postprocessing = Compose([
        Activationsd(keys=pred_key, softmax=True),
        AsDiscreted(keys=pred_key, argmax=True),
        Invertd(keys=pred_key, transform=preprocessing, orig_keys=image_key, nearest_interp=True, to_tensor=True),
    ])
    return preprocessing, postprocessing


def sliding_window_pipeline(source: str, network: Any, pre: TorchScriptPreprocessing, device: torch.device,
                            amp: bool) -> InferencePipeline:
    """The :class:`InferencePipeline` of a single-file network: :func:`pipeline_transforms` around a Gaussian
    sliding window of ``pre.roi_size`` (what the project's bundles run; the softmax gives the confidence signal)."""
    from monai.inferers import SlidingWindowInferer

    preprocessing, postprocessing = pipeline_transforms(pre, "image", "pred")
    return InferencePipeline(
        source=source,
        preprocessing=preprocessing,
        network=network,
        inferer=SlidingWindowInferer(
            roi_size=list(pre.roi_size),
            sw_batch_size=pre.sw_batch_size,
            overlap=pre.overlap,
            mode="gaussian",
            padding_mode=pre.padding_mode,
        ),
        postprocessing=postprocessing,
        device=device,
        amp=amp,
        softmax_output=applies_softmax(postprocessing, "pred"),
    )


class TorchScriptSegmentationModel(SegmentationPipelineModel):
    """A TorchScript segmentation network with explicit preprocessing, loaded once.

    ``path``: the ``.ts`` file. ``preprocessing``: see :class:`TorchScriptPreprocessing`.
    ``labels``: ``{network output value: SegmentLabel}``; values without a label
    become background. ``device`` / ``amp`` as for
    :class:`~workers.models.monai_bundle.MonaiBundleModel`. ``model_id``,
    ``name``, ``version`` name the model in results.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        preprocessing: TorchScriptPreprocessing,
        labels: Mapping[int, SegmentLabel],
        device: str | torch.device | None = None,
        amp: bool | None = None,
        model_id: str | None = None,
        name: str | None = None,
        version: str = "unknown",
    ) -> None:
        started = time.perf_counter()
        self.path = Path(path)
        source = f"TorchScript model {self.path}"
        check_file_and_labels(self.path, labels, source)
        self.device = resolve_device(device)
        network = load_torchscript(self.path, self.device, source)
        self._mapping = dict(labels)
        self._algorithm = file_algorithm(self.path, model_id, name, version)
        self._pipeline = sliding_window_pipeline(source, network, preprocessing, self.device,
                                                 self.device.type == "cuda" if amp is None else bool(amp))
        logger.info(
            "loaded %s as model %s on %s (AMP %s) in %.1f s",
            source, self._algorithm.model_id, self.device, self._pipeline.amp, time.perf_counter() - started,
        )
