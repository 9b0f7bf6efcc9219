"""Export the shipped demo networks to ONNX, and quantise an ONNX export to INT8.

Why: ONNX is the hand-over format of deployment tool chains (ONNX Runtime on
CPU and GPU, TensorRT) and the start of INT8 quantisation, which makes CPU
inference cheaper. The node serves an ``.onnx`` file with the same preprocessing
declaration as a TorchScript file (:mod:`workers.models.onnx_model`); this module
makes such files from a bundle and writes the registry entry's ``preprocessing``
that goes with them.

What exports, and what does not:

* The segmentation bundle's network (:class:`~workers.models.segmentation_networks.AnatomyWithNoduleBranch`):
  the anatomy SegResNet, the nodule branch with its mirroring, and the join
  all export. Its small-nodule stage
  (:class:`~workers.models.small_nodules.SmallNoduleStage`) does not: it takes a
  data-dependent number of blob candidates (``nonzero``, ``topk`` of a varying
  count), computes Hessian eigenvalues (``torch.linalg.eigvalsh``, no ONNX
  operator) only where the Hessian is negative definite, and paints the accepted
  ones in a Python loop; a traced graph would freeze one window's candidates. The
  export therefore replaces the stage by one that paints nothing (the branch's cap
  at :data:`~workers.models.segmentation_networks.BRANCH_MAX_PROBABILITY` stays), so
  the ONNX model finds what the bundle finds except the nodules that only the
  stage adds (most nodules under 6 mm). :attr:`OnnxExport.left_out` says so.
* The bundle's postprocessing beyond softmax/argmax (its small-component filter
  and keep-inside-body step) is MONAI code, not network: an ONNX entry's
  preprocessing declaration has no place for it, so the served ONNX model runs
  without it.
* The detection bundle's CenterNet network exports as it is (its decoding is
  Python code of the loader, not part of the network).

Exporter: PyTorch's TorchScript-based ``torch.onnx.export(dynamo=False)``; the
default ``torch.export``-based one needs the ``onnxscript`` package, which the
node does not otherwise need. Batch and spatial axes are dynamic.

INT8 (:func:`quantize_int8`): ONNX Runtime's static quantisation (QDQ format,
per-channel weights, activations calibrated with MinMax on sliding windows of a
few phantom volumes), or its dynamic quantisation, which needs no calibration but
quantises only matrix multiplications and 1x1 layers well: on a 3D
convolutional network nearly all compute is ``Conv``, which dynamic
quantisation leaves in float32 (``ConvInteger`` has no fast CPU kernel).
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "DEFAULT_OPSET",
    "OnnxExport",
    "bundle_network",
    "calibration_windows",
    "export_bundle_onnx",
    "export_network_onnx",
    "onnx_preprocessing",
    "phantom_volume",
    "quantize_int8",
    "sliding_windows",
]

logger = logging.getLogger(__name__)

#: ONNX opset of the exports: supported by ONNX Runtime 1.16+ and TensorRT 8.6+.
DEFAULT_OPSET = 17


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_bundle_onnx` wrote: the file, the preprocessing that goes with it, what was left out."""

    path: Path
    kind: str
    preprocessing: dict[str, Any] | None
    left_out: tuple[str, ...] = field(default=())


def export_network_onnx(
    network: torch.nn.Module,
    out: str | Path,
    example_input: torch.Tensor,
    *,
    output_names: Sequence[str] = ("logits",),
    opset: int = DEFAULT_OPSET,
) -> Path:
    """Write ``network`` (in eval mode, on the CPU) to ``out`` as ONNX: input ``image`` (batch, C, x, y, z).

    The batch and spatial axes of the input and of each output are dynamic;
    ``example_input`` gives the traced shapes (a sliding window of the model).
    Raises RuntimeError naming the network and the reason when it does not export.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    net = network.to("cpu").eval()
    axes = {0: "batch", 2: "x", 3: "y", 4: "z"}
    dynamic = {"image": axes, **{name: axes for name in output_names}}
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter is deprecated in recent PyTorch, but needs no onnxscript.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(
                net, (example_input.to("cpu", torch.float32),), str(out), dynamo=False,
                input_names=["image"], output_names=list(output_names), dynamic_axes=dynamic,
                opset_version=opset, do_constant_folding=True,
            )
        except Exception as exc:  # the exporter raises many types (SymbolicValueError, RuntimeError, ...)
            raise RuntimeError(f"{type(network).__name__} does not export to ONNX: {type(exc).__name__}: {exc}") \
                from exc
    logger.info("wrote %s (%s, opset %d, %.1f MB)", out, type(network).__name__, opset, out.stat().st_size / 1e6)
    return out


def bundle_network(bundle_dir: str | Path) -> tuple[torch.nn.Module, Any]:
    """The bundle's ``network_def`` with its ``models/model.pt`` weights (eval, CPU), and its parsed config."""
    from monai.bundle import ConfigParser

    bundle_dir = Path(bundle_dir)
    config = bundle_dir / "configs" / "inference.json"
    weights = bundle_dir / "models" / "model.pt"
    for needed in (config, weights):
        if not needed.is_file():
            raise FileNotFoundError(f"bundle {bundle_dir}: no {needed.relative_to(bundle_dir)}")
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle_dir)
    network = parser.get_parsed_content("network_def")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    network.load_state_dict(state)
    return network.eval(), parser


class _PaintsNothing(torch.nn.Module):
    """Stands in for the small-nodule stage in an export: paints no voxel (the stage does not trace)."""

    def forward(self, x: torch.Tensor, anatomy_logits: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x, dtype=torch.bool)


def _exportable(network: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """A copy of ``network`` without the parts that do not export, and what was left out."""
    from workers.models.segmentation_networks import AnatomyWithNoduleBranch

    left_out: list[str] = []
    if isinstance(network, AnatomyWithNoduleBranch) and network.has_small_nodules:
        network = copy.deepcopy(network)
        network.small_nodules = _PaintsNothing()
        left_out.append(
            "small-nodule stage (Hessian blob candidates + patch classifier: data-dependent candidate count and "
            "eigvalsh do not export); nodules only it finds (mostly under 6 mm) are missing"
        )
    return network, left_out


def onnx_preprocessing(parser: Any) -> dict[str, Any]:
    """The registry entry's ``preprocessing`` (TorchScriptPreprocessing fields) read from a bundle's config.

    Takes the spacing (``Spacingd``), the HU window (``ScaleIntensityRanged``) and
    the sliding window (``inferer``) of a bundle of the project's layout.
    """
    found: dict[str, Any] = {}
    for item in parser["preprocessing"]["transforms"]:
        target = str(item.get("_target_", "")).rsplit(".", 1)[-1]
        if target == "Spacingd":
            found["spacing_mm"] = [float(v) for v in item["pixdim"]]
        elif target == "ScaleIntensityRanged":
            found["window_hu"] = [float(item["a_min"]), float(item["a_max"])]
    inferer = parser["inferer"]
    found["roi_size"] = [int(v) for v in inferer["roi_size"]]
    found["sw_batch_size"] = int(inferer.get("sw_batch_size", 1))
    found["overlap"] = float(inferer.get("overlap", 0.25))
    if "padding_mode" in inferer:
        found["padding_mode"] = str(inferer["padding_mode"])
    missing = {"spacing_mm", "window_hu"} - found.keys()
    if missing:
        raise ValueError(f"bundle preprocessing has no {', '.join(sorted(missing))} (Spacingd / ScaleIntensityRanged)")
    return found


def export_bundle_onnx(bundle_dir: str | Path, out: str | Path, *, opset: int = DEFAULT_OPSET) -> OnnxExport:
    """Export a bundle's network with its weights to ``out`` (ONNX); see the module docstring for what exports.

    A segmentation bundle's export takes one sliding window as its example and
    comes with the registry entry's ``preprocessing``; a detection bundle's
    (``dicom_node.kind`` detection) gives its raw output maps (no preprocessing: the
    node serves detection only as a bundle).
    """
    bundle_dir = Path(bundle_dir)
    network, parser = bundle_network(bundle_dir)
    meta_file = bundle_dir / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text(encoding="utf-8")) if meta_file.is_file() else {}
    kind = str((meta.get("dicom_node") or {}).get("kind", "segmentation"))
    network, left_out = _exportable(network)
    roi = [int(v) for v in parser["inferer"]["roi_size"]]
    if kind == "detection":
        roi = [min(v, 64) for v in roi]  # the trace only needs a representative shape; the axes stay dynamic
        path = export_network_onnx(network, out, torch.zeros(1, 1, *roi), output_names=("maps",), opset=opset)
        return OnnxExport(path=path, kind=kind, preprocessing=None, left_out=tuple(left_out))
    pre = onnx_preprocessing(parser)
    path = export_network_onnx(network, out, torch.rand(1, 1, *roi), opset=opset)
    return OnnxExport(path=path, kind=kind, preprocessing=pre, left_out=tuple(left_out))


def sliding_windows(images: Iterable[npt.NDArray[np.float32]], roi_size: Sequence[int],
                    per_image: int = 8, seed: int = 0) -> Iterator[npt.NDArray[np.float32]]:
    """Windows ``(1, 1, *roi_size)`` of preprocessed images ``(1, x, y, z)`` (0..1), for INT8 calibration.

    ``per_image`` windows of each image at random positions (seeded), padded with
    the edge value where the image is smaller than the window.
    """
    rng = np.random.default_rng(seed)
    roi = [int(v) for v in roi_size]
    for image in images:
        arr = np.asarray(image, dtype=np.float32)
        pad = [(0, 0)] + [(0, max(0, r - s)) for r, s in zip(roi, arr.shape[1:])]
        arr = np.pad(arr, pad, mode="edge")
        for _ in range(per_image):
            start = [int(rng.integers(0, s - r + 1)) for r, s in zip(roi, arr.shape[1:])]
            window = arr[:, start[0]:start[0] + roi[0], start[1]:start[1] + roi[1], start[2]:start[2] + roi[2]]
            yield np.ascontiguousarray(window[None])


def phantom_volume(seed: int, config: Any = None) -> Any:
    """A chest phantom (:func:`training.phantoms.chest.generate_chest_phantom`, default config) as a workers
    :class:`~workers.volume.Volume` (axial, LPS axes), without writing DICOM files."""
    from training.phantoms.chest import PhantomConfig, generate_chest_phantom
    from workers.volume import FrameRef, Volume

    phantom = generate_chest_phantom(config or PhantomConfig(), seed=seed)
    uid = f"2.25.{1000 + seed}"
    return Volume(
        array=np.asarray(phantom.volume_hu, dtype=np.float32),
        spacing_mm=tuple(float(v) for v in phantom.spacing_mm),
        origin_mm=tuple(float(v) for v in phantom.origin_xyz_mm),
        axes=np.asarray([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]),  # slice, row, column directions
        series_instance_uid=uid, study_instance_uid=uid, frame_of_reference_uid=uid, modality="CT",
        frames=tuple(FrameRef(f"{uid}.{k + 1}") for k in range(phantom.shape[0])), datasets=(),
    )


def calibration_windows(preprocessing: dict[str, Any], volumes: int, *, per_image: int = 8, first_seed: int = 9000,
                        config: Any = None) -> Iterator[npt.NDArray[np.float32]]:
    """Network inputs for static INT8 calibration: sliding windows of ``volumes`` chest phantoms.

    Each phantom (seeds ``first_seed``...; ``config`` a PhantomConfig, default the
    training default) goes through the served ONNX model's own preprocessing chain
    (``preprocessing``: the registry entry's fields), then :func:`sliding_windows`.
    """
    from dicom_node.model_catalog import TorchScriptPreprocessing
    from workers.models.monai_bundle import volume_to_metatensor
    from workers.models.torchscript import pipeline_transforms

    pre = TorchScriptPreprocessing(**preprocessing)
    chain, _ = pipeline_transforms(pre, "image", "pred")
    images = (chain({"image": volume_to_metatensor(phantom_volume(first_seed + k, config))})["image"].numpy()
              for k in range(volumes))
    return sliding_windows(images, pre.roi_size, per_image=per_image, seed=first_seed)


def quantize_int8(
    onnx_in: str | Path,
    onnx_out: str | Path,
    *,
    mode: Literal["static", "dynamic"] = "static",
    calibration: Iterable[npt.NDArray[np.float32]] | None = None,
) -> Path:
    """Quantise an ONNX float model to INT8 with ONNX Runtime and write it to ``onnx_out``.

    ``static``: QDQ, signed INT8 activations and per-channel weights, activation
    ranges from ``calibration`` (network inputs, e.g. :func:`sliding_windows`; required).
    ``dynamic``: INT8 weights, activations quantised at run time, no calibration.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    onnx_in, onnx_out = Path(onnx_in), Path(onnx_out)
    onnx_out.parent.mkdir(parents=True, exist_ok=True)
    if mode == "dynamic":
        quantize_dynamic(str(onnx_in), str(onnx_out), weight_type=QuantType.QInt8, per_channel=True)
        return onnx_out
    if mode != "static":
        raise ValueError(f"mode must be 'static' or 'dynamic', got {mode!r}")
    if calibration is None:
        raise ValueError("static INT8 quantisation needs calibration inputs")

    class _Reader(CalibrationDataReader):
        def __init__(self, inputs: Iterable[npt.NDArray[np.float32]]) -> None:
            self._inputs = iter(inputs)

        def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
            item = next(self._inputs, None)
            return None if item is None else {"image": np.asarray(item, dtype=np.float32)}

    prepared = onnx_out.with_name(onnx_out.stem + ".prep.onnx")
    try:
        quant_pre_process(str(onnx_in), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared), str(onnx_out), _Reader(calibration), quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
    finally:
        prepared.unlink(missing_ok=True)
    return onnx_out
