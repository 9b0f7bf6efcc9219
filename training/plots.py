"""Every figure the training package draws: training curves, validation overlays, FROC, detections, lesions.

Why: one module for the pictures, so the task packages share the drawing helpers
(radiological display of an axial RAS slice, label colours, panel grids) and no
task module imports another for a plot. Matplotlib is imported inside the
functions (Agg backend), so importing this module stays cheap.

Conventions: volumes are RAS arrays (x, y, z); an axial slice (x, y) is shown
radiologically - patient right on the image's left, anterior up (:func:`display`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from training.metrics import DEFAULT_FP_RATES, FrocResult
from workers.models.detection_network import Detection, lps_to_ras

if TYPE_CHECKING:
    from training.detection.data import DetectionCase

__all__ = [
    "LUNG_WINDOW",
    "LesionCrop",
    "PlotLabel",
    "blank_grid",
    "display",
    "draw_ct",
    "label_rgba",
    "lesion_crop",
    "overlay_figure",
    "plot_detection_training",
    "plot_detections",
    "plot_froc",
    "plot_lesion_gallery",
    "plot_segmentation_training",
    "pyplot",
    "save_figure",
]

#: Lung window for the pictures (level, width) in HU.
LUNG_WINDOW = (-600.0, 1500.0)


class _Label(Protocol):
    """What a picture needs of a label: its value in the label map, its name and colour."""

    @property
    def value(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def color_rgb(self) -> Sequence[int]: ...


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


class PlotLabel:
    """The (value, name, color_rgb) of a label read back from bundle metadata, for the plots."""

    def __init__(self, value: int, name: str, color_rgb: Sequence[int]) -> None:
        self.value, self.name, self.color_rgb = value, name, tuple(color_rgb)


# --------------------------------------------------------------------------- segmentation


def plot_segmentation_training(record: Mapping[str, Any], labels: Sequence[_Label], plots_dir: Path) -> None:
    """``loss.png`` (training loss per epoch) and ``dice.png`` (validation Dice per label) in ``plots_dir``."""
    plt = pyplot()
    plots_dir.mkdir(parents=True, exist_ok=True)
    epochs = [e["epoch"] for e in record["epochs"]]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [e["loss"] for e in record["epochs"]], marker="o")
    ax.set_xlabel("epoch")
    ax.set_ylabel("DiceCE loss (training)")
    ax.set_title("Segmentation training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(plots_dir / "loss.png", dpi=100)
    plt.close(fig)

    validated = [e for e in record["epochs"] if "validation_dice" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    for spec in labels:
        ax.plot([e["epoch"] for e in validated], [e["validation_dice"][spec.name] for e in validated],
                marker="o", label=spec.name, color=np.asarray(spec.color_rgb) / 255.0)
    ax.plot([e["epoch"] for e in validated], [e["validation_mean_dice"] for e in validated],
            marker="s", color="black", linestyle="--", label="mean")
    ax.set_xlabel("epoch")
    ax.set_ylabel("Dice (validation)")
    ax.set_ylim(0, 1.02)
    ax.set_title("Validation Dice per label")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(plots_dir / "dice.png", dpi=100)
    plt.close(fig)


def display(slice_xy: np.ndarray) -> np.ndarray:
    """An axial RAS (x, y) slice as a radiological image: patient right on the left, anterior up."""
    return np.swapaxes(np.asarray(slice_xy), 0, 1)[::-1, ::-1]


def blank_grid(plt: Any, rows: int, columns: int, cell_inches: tuple[float, float]) -> tuple[Any, Any]:
    """(figure, axes[row][column]) of a grid of panels, axes hidden: panels left empty stay blank."""
    width, height = cell_inches
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes


def save_figure(plt: Any, fig: Any, path: Path, dpi: int = 90) -> None:
    """Write ``fig`` to ``path`` (its folder made) and close it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def draw_ct(ax: Any, slice_xy: np.ndarray, window: tuple[float, float]) -> None:
    """An axial RAS slice of HU on ``ax``, radiologically, in the (level, width) window."""
    level, width = window
    ax.imshow(display(slice_xy), cmap="gray", vmin=level - width / 2, vmax=level + width / 2,
              interpolation="nearest")


def label_rgba(labelmap: np.ndarray, labels: Sequence[_Label], alpha: float = 0.45) -> np.ndarray:
    """An RGBA image of ``labelmap``: each label's colour at ``alpha``, transparent elsewhere."""
    rgba = np.zeros((*labelmap.shape, 4), dtype=np.float32)
    for spec in labels:
        mask = labelmap == spec.value
        rgba[mask, :3] = np.asarray(spec.color_rgb, dtype=np.float32) / 255.0
        rgba[mask, 3] = alpha
    return rgba


def _slices_of_interest(ref: np.ndarray, count: int, nodule_value: int | None) -> list[int]:
    """Axial slice indices: through the largest nodule cross-sections first, then evenly through the body."""
    depth = ref.shape[2]
    chosen: list[int] = []
    if nodule_value is not None:
        areas = (ref == nodule_value).sum(axis=(0, 1))
        for z in np.argsort(areas)[::-1]:
            if areas[z] == 0 or len(chosen) >= max(1, count // 2):
                break
            if all(abs(int(z) - c) > 3 for c in chosen):
                chosen.append(int(z))
    body = np.flatnonzero((ref > 0).any(axis=(0, 1)))
    lo, hi = (int(body[0]), int(body[-1])) if body.size else (0, depth - 1)
    for z in np.linspace(lo + 0.2 * (hi - lo), hi - 0.2 * (hi - lo), count).round().astype(int):
        if len(chosen) >= count:
            break
        if all(abs(int(z) - c) > 1 for c in chosen):
            chosen.append(int(z))
    return sorted(chosen)


def overlay_figure(
    rows: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], labels: Sequence[_Label], path: Path,
    *, window: tuple[float, float] = LUNG_WINDOW, slices_per_row: int = 4,
) -> None:
    """rows: (title, CT in HU, predicted labels, reference labels), all RAS (x, y, z)."""
    plt = pyplot()
    from matplotlib.patches import Patch

    nodule = next((s.value for s in labels if s.name == "nodule"), None)
    fig, axes = blank_grid(plt, len(rows), slices_per_row, (3.2, 3.4))
    for r, (title, ct, pred, ref) in enumerate(rows):
        for c, z in enumerate(_slices_of_interest(ref, slices_per_row, nodule)):
            ax = axes[r][c]
            draw_ct(ax, ct[:, :, z], window)
            ax.imshow(display(label_rgba(pred[:, :, z], labels)), interpolation="nearest")
            ref_slice = display(ref[:, :, z])
            for spec in labels:
                mask = (ref_slice == spec.value).astype(np.float32)
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=[np.asarray(spec.color_rgb) / 255.0], linewidths=0.8)
            ax.set_title(f"{title} z={z}", fontsize=8)
    handles = [Patch(color=np.asarray(s.color_rgb) / 255.0, label=s.name) for s in labels]
    fig.legend(handles=handles, loc="lower center", ncol=len(labels), fontsize=8,
               title="fill: prediction, line: reference", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    save_figure(plt, fig, path)


# --------------------------------------------------------------------------- lesions


@dataclass(frozen=True)
class LesionCrop:
    """An axial square around one lesion, RAS (x, y): CT in HU, reference and predicted masks, a caption."""

    caption: str
    ct: np.ndarray
    reference: np.ndarray
    prediction: np.ndarray


def lesion_crop(
    ct: np.ndarray, reference: np.ndarray, prediction: np.ndarray, centre_voxel: Sequence[int],
    caption: str, half_width: int = 16,
) -> LesionCrop:
    """The axial slice through ``centre_voxel`` of RAS (x, y, z) volumes, cut to ``2 * half_width`` voxels square.

    Parts of the square outside the volume are filled with -1024 HU and no mask.
    """
    if not (ct.shape == reference.shape == prediction.shape and ct.ndim == 3):
        raise ValueError(f"ct, reference and prediction must be one (x, y, z) shape, got "
                         f"{ct.shape}, {reference.shape}, {prediction.shape}")
    x, y, z = (int(v) for v in centre_voxel)
    if not 0 <= z < ct.shape[2]:
        raise ValueError(f"centre_voxel {tuple(centre_voxel)} is outside the volume of shape {ct.shape}")
    side = 2 * half_width
    out = [np.full((side, side), -1024.0, dtype=np.float32), np.zeros((side, side), bool), np.zeros((side, side), bool)]
    x0, y0 = x - half_width, y - half_width
    xs, ys = slice(max(x0, 0), min(x0 + side, ct.shape[0])), slice(max(y0, 0), min(y0 + side, ct.shape[1]))
    for target, volume in zip(out, (ct, reference, prediction)):
        target[xs.start - x0 : xs.stop - x0, ys.start - y0 : ys.stop - y0] = volume[xs, ys, z]
    return LesionCrop(caption, *out)


def plot_lesion_gallery(
    rows: Sequence[tuple[str, Sequence[LesionCrop]]], path: Path, *, window: tuple[float, float] = LUNG_WINDOW,
    color_rgb: Sequence[int] = (255, 230, 0),
) -> None:
    """One row per (title, crops): the CT in a lung window, the prediction filled, the reference outlined."""
    plt = pyplot()
    rows = [(title, crops) for title, crops in rows if crops]
    if not rows:
        return
    columns = max(len(crops) for _, crops in rows)
    fill = [PlotLabel(1, "prediction", color_rgb)]
    fig, axes = blank_grid(plt, len(rows), columns, (2.4, 2.6))
    for r, (title, crops) in enumerate(rows):
        for c, crop in enumerate(crops):
            ax = axes[r][c]
            draw_ct(ax, crop.ct, window)
            ax.imshow(display(label_rgba(crop.prediction.astype(np.uint8), fill)), interpolation="nearest")
            if crop.reference.any():
                ax.contour(display(crop.reference.astype(np.float32)), levels=[0.5], colors=["red"],
                           linewidths=1.0)
            ax.set_title(f"{title}\n{crop.caption}" if c == 0 else crop.caption, fontsize=7)
    fig.suptitle("fill: prediction, red line: reference", fontsize=8)
    fig.tight_layout()
    save_figure(plt, fig, path)


# --------------------------------------------------------------------------- detection


def plot_detection_training(record: Mapping[str, Any], path: Path, *, large_mm: float) -> None:
    """Training losses per epoch (log scale) and the validation CPMs and sensitivity of nodules >= ``large_mm``."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    epochs = [e["epoch"] for e in record["epochs"]]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "heatmap", "size", "offset"):
        ax.plot(epochs, [e[key] for e in record["epochs"]], label=key)
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    vals = record["validations"]
    ax2.plot([v["epoch"] for v in vals], [v["all"]["cpm"] for v in vals], "o-", label="CPM all")
    ax2.plot([v["epoch"] for v in vals], [v["large"]["cpm"] for v in vals], "s-", label=f"CPM >= {large_mm:g} mm")
    ax2.plot([v["epoch"] for v in vals], [v["large"]["sensitivity_at"]["1"] for v in vals], "^-",
             label=f"sens @ 1 FP/scan, >= {large_mm:g} mm")
    ax2.set_ylim(0, 1.02)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_froc(results: Mapping[str, FrocResult], path: Path, *, title: str) -> None:
    """FROC curves (sensitivity against false positives per scan, log scale) with their operating points."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, result in results.items():
        fps = np.asarray(result.curve_fps_per_scan)
        sens = np.asarray(result.curve_sensitivity)
        if fps.size:
            ax.step(np.maximum(fps, 1 / 16), sens, where="post", label=f"{name}: CPM {result.cpm:.3f}")
        ax.plot(result.fp_rates, result.sensitivities, "o", color=ax.lines[-1].get_color() if ax.lines else None)
    ax.set_xscale("log", base=2)
    ax.set_xlim(1 / 16, 16)
    ax.set_ylim(0, 1.02)
    ax.set_xticks(list(DEFAULT_FP_RATES))
    ax.set_xticklabels([f"{r:g}" for r in DEFAULT_FP_RATES])
    ax.set_xlabel("average false positives per scan")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_detections(
    cases: Sequence[DetectionCase], detections: Sequence[Sequence[Detection]], path: Path,
    *, max_panels: int = 6, min_score: float = 0.1,
) -> None:
    """Axial slices through validation nodules: reference circles (green), detected boxes (red, score)."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    # nodules spread over the size range (smallest to largest), not only the easy large ones
    panels = sorted(
        ((ci, k) for ci, case in enumerate(cases) for k in range(len(case.sizes_mm))),
        key=lambda p: float(cases[p[0]].sizes_mm[p[1]].mean()),
    )
    if len(panels) > max_panels:
        panels = [panels[int(round(i))] for i in np.linspace(0, len(panels) - 1, max_panels)]
    ordered = panels
    if not ordered:
        fig, ax = plt.subplots(figsize=(4, 4))
        ax.text(0.5, 0.5, "no nodule in the validation cases", ha="center")
        ax.axis("off")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return
    cols = min(3, len(ordered))
    rows = math.ceil(len(ordered) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 4.2 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    from matplotlib.patches import Circle, Rectangle

    for ax, (ci, k) in zip(axes.ravel(), ordered):
        case = cases[ci]
        image = case.image.numpy()
        nx, ny = image.shape[0], image.shape[1]
        sx, sy, sz = case.grid.spacing
        cx, cy, cz = case.centres_vox[k]
        z = int(np.clip(round(cz), 0, image.shape[2] - 1))
        # radiological display: patient right on the image's left, anterior up
        ax.imshow(image[::-1, ::-1, z].T, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        ref_d = float(case.sizes_mm[k].mean())
        dz_mm = (z - cz) * sz
        r_mm = math.sqrt(max((ref_d / 2) ** 2 - dz_mm**2, 0.25))
        col, row = nx - 1 - cx, ny - 1 - cy
        ax.add_patch(Circle((col, row), r_mm / sx, fill=False, color="lime", lw=1.2))
        for det in detections[ci]:
            if det.score < min_score:
                continue
            idx = case.grid.to_index(lps_to_ras(det.centre_xyz_mm))
            size = np.asarray(det.size_xyz_mm or (det.diameter_mm,) * 3)
            if abs(idx[2] - z) * sz > size[2] / 2:
                continue
            w, h = size[0] / sx, size[1] / sy
            dc, dr = nx - 1 - idx[0], ny - 1 - idx[1]
            ax.add_patch(Rectangle((dc - w / 2, dr - h / 2), w, h, fill=False, color="red", lw=1.0))
            ax.text(dc - w / 2, dr - h / 2 - 1, f"{det.score:.2f}", color="red", fontsize=7, clip_on=True)
        half = max(30.0, 2.5 * ref_d) / sx
        ax.set_xlim(col - half, col + half)
        ax.set_ylim(row + half, row - half)
        ax.set_title(f"{case.name} z={z}: {ref_d:.1f} mm", fontsize=9)
    fig.suptitle(f"validation: reference (green), detections >= {min_score:g} (red, score)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
