"""Serve an ONNX segmentation network (a ``.onnx`` file) through ONNX Runtime as a :class:`~workers.models.base.Model`.

Why: ONNX is what other frameworks export to, and what deployment tool chains
(TensorRT, INT8 quantisation) start from; a hospital may bring a network only as
an ``.onnx`` file. Like a TorchScript file it carries no preprocessing, so the
registry entry declares it (:class:`~dicom_node.model_catalog.TorchScriptPreprocessing`:
spacing, HU window, sliding window) and this loader runs exactly the TorchScript
loader's MONAI chain (:mod:`workers.models.torchscript`: RAS orientation,
resampling, window, Gaussian sliding window, softmax, argmax, inversion to the
input grid) with one difference: the network call is an ONNX Runtime session
(:class:`OnnxNetwork`). Results carry ``low_confidence_fraction`` from the logits,
as TorchScript results do.

Execution providers (:func:`execution_providers`): on a CUDA device, TensorRT and
CUDA when this ONNX Runtime build has them (``onnxruntime-gpu``), the CPU after
them as ONNX Runtime's fallback; on the CPU, the CPU provider. Which ones the
session really uses is logged. A session takes and gives NumPy arrays, so each
sliding-window batch goes through host memory; on the CPU this costs nothing.

The file's contract: one float32 input ``(batch, 1, x, y, z)`` (the spatial axes
may be fixed, then ``roi_size`` must be those sizes; a fixed batch size is run in
chunks of it) and one output ``(batch, labels + 1, x, y, z)`` of
logits, channel i for label value i (the layout :mod:`training.onnx_export`
writes).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from dicom_node.contracts import SegmentLabel
from dicom_node.model_catalog import BundleError, TorchScriptPreprocessing
from workers.models.loading import file_algorithm, resolve_device
from workers.models.monai_bundle import SegmentationPipelineModel
from workers.models.torchscript import check_file_and_labels, sliding_window_pipeline

__all__ = ["OnnxNetwork", "OnnxSegmentationModel", "execution_providers"]

logger = logging.getLogger(__name__)

#: Providers preferred on a CUDA device, best first, when the installed ONNX Runtime has them.
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
_CPU_PROVIDER = "CPUExecutionProvider"


def execution_providers(device: torch.device, available: Sequence[str] | None = None) -> list[Any]:
    """ONNX Runtime providers for ``device``, best first, as ``InferenceSession(providers=...)`` takes them.

    ``available``: the providers of this ONNX Runtime build (default
    ``onnxruntime.get_available_providers()``). A CUDA device gets TensorRT and CUDA
    where available (with its device id), then the CPU; a CUDA device when neither
    is available is an error naming what is there (``onnxruntime-gpu`` is missing).
    """
    if available is None:
        import onnxruntime as ort

        available = ort.get_available_providers()
    if device.type == "cpu":
        return [_CPU_PROVIDER]
    if device.type != "cuda":
        raise BundleError(f"ONNX Runtime cannot run on device {str(device)!r}; use cpu or cuda[:N]")
    options = {"device_id": device.index or 0}
    gpu = [(name, dict(options)) for name in _GPU_PROVIDERS if name in available]
    if not gpu:
        raise BundleError(
            f"device {str(device)!r} requested, but this ONNX Runtime has no GPU provider (available: "
            f"{', '.join(available)}); install onnxruntime-gpu"
        )
    return [*gpu, _CPU_PROVIDER]


class OnnxNetwork:
    """An ONNX Runtime session as the callable a MONAI inferer takes: ``(B, C, ...)`` tensor in, tensor out.

    ``path``: the ``.onnx`` file; ``device``: where inputs come from and outputs go
    (and which providers run the session, :func:`execution_providers`);
    ``threads``: intra-op threads of the session (default ONNX Runtime's: all cores).
    The session's first input takes the tensor as float32; its first output is returned.
    """

    def __init__(self, path: str | Path, device: torch.device, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        self.device = device
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(
                str(self.path), sess_options=options, providers=execution_providers(device)
            )
        except BundleError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise BundleError(f"ONNX model {self.path}: ONNX Runtime cannot load it: {exc}") from exc
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1:
            raise BundleError(f"ONNX model {self.path}: has {len(inputs)} inputs "
                              f"({', '.join(i.name for i in inputs)}); a segmentation network takes one image")
        self.input_name = inputs[0].name
        self.input_shape = tuple(inputs[0].shape)
        self.output_name = outputs[0].name
        if len(self.input_shape) != 5:
            raise BundleError(f"ONNX model {self.path}: input {self.input_name!r} has shape {self.input_shape}; "
                              "expected (batch, channel, x, y, z)")

    @property
    def providers(self) -> list[str]:
        """The providers the session runs with, best first."""
        return list(self.session.get_providers())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        batch = self.input_shape[0]
        if not isinstance(batch, int) or batch == array.shape[0]:
            out = self._run(array)
        else:  # a fixed batch size: run in chunks of it, the last one padded with zeros
            chunks = []
            for start in range(0, array.shape[0], batch):
                part = array[start:start + batch]
                short = batch - part.shape[0]
                if short:
                    part = np.concatenate([part, np.zeros((short, *part.shape[1:]), part.dtype)])
                chunks.append(self._run(part)[: batch - short])
            out = np.concatenate(chunks)
        return torch.from_numpy(out).to(x.device)

    def _run(self, array: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        (out,) = self.session.run([self.output_name], {self.input_name: array})
        return np.asarray(out, dtype=np.float32)


class OnnxSegmentationModel(SegmentationPipelineModel):
    """An ONNX segmentation network with explicit preprocessing, loaded once into an ONNX Runtime session.

    ``path``: the ``.onnx`` file. ``preprocessing``: see :class:`TorchScriptPreprocessing`.
    ``labels``: ``{network output value: SegmentLabel}``; values without a label
    become background. ``device``: see :func:`~workers.models.loading.resolve_device`;
    the session's providers follow it (:func:`execution_providers`). ``threads``:
    the session's intra-op threads. ``model_id``, ``name``, ``version`` name the
    model in results.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        preprocessing: TorchScriptPreprocessing,
        labels: Mapping[int, SegmentLabel],
        device: str | torch.device | None = None,
        threads: int | None = None,
        model_id: str | None = None,
        name: str | None = None,
        version: str = "unknown",
    ) -> None:
        started = time.perf_counter()
        self.path = Path(path)
        source = f"ONNX model {self.path}"
        check_file_and_labels(self.path, labels, source)
        self.device = resolve_device(device)
        self.network = OnnxNetwork(self.path, self.device, threads)
        _check_fixed_axes(self.network.input_shape, preprocessing, source)
        self._mapping = dict(labels)
        self._algorithm = file_algorithm(self.path, model_id, name, version)
        # amp False: the session decides its own precision; autocast would only touch the blending.
        self._pipeline = sliding_window_pipeline(source, self.network, preprocessing, self.device, amp=False)
        logger.info(
            "loaded %s as model %s on %s with ONNX Runtime providers %s in %.1f s",
            source, self._algorithm.model_id, self.device, ", ".join(self.network.providers),
            time.perf_counter() - started,
        )

    @property
    def providers(self) -> list[str]:
        """The ONNX Runtime execution providers the model runs with, best first."""
        return self.network.providers


def _check_fixed_axes(shape: Sequence[Any], pre: TorchScriptPreprocessing, source: str) -> None:
    """Fixed (integer) channel or spatial sizes of the ONNX input must fit the declared sliding window."""
    _, channels, *spatial = shape
    if isinstance(channels, int) and channels != 1:
        raise BundleError(f"{source}: input takes {channels} channels; the preprocessing gives one (the CT image)")
    for axis, (fixed, roi) in enumerate(zip(spatial, pre.roi_size)):
        if isinstance(fixed, int) and fixed != roi:
            raise BundleError(f"{source}: input axis {'xyz'[axis]} is fixed at {fixed} voxels but roi_size is "
                              f"{list(pre.roi_size)}; set preprocessing.roi_size to the network's input size")
