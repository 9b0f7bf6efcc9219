"""The shipped bundles run without the ``training`` package: ``monai.bundle run`` of the segmentation bundle and
the detection bundle's network, pre- and postprocessing, in a fresh interpreter where ``import training`` fails.

Why: a GPU worker is installed without the trainer (DESIGN.md, "Layers"); the static check of
tests/unit/test_import_layers.py reads imports and ``_target_`` strings, this one runs the configs as MONAI
does, so an import hidden behind a MONAI component or a ``$`` expression fails here too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from training.phantoms.chest import PhantomConfig, generate_chest_phantom

REPO = Path(__file__).resolve().parents[3]
BUNDLES = REPO / "workers" / "bundles"

#: Prepended to each script: a meta path finder that refuses ``training`` (it is importable from the repository
#: root otherwise), and a check that it does.
_REFUSE_TRAINING = textwrap.dedent("""
    import sys

    class RefuseTraining:
        def find_spec(self, name, path=None, target=None):
            if name == "training" or name.startswith("training."):
                raise ModuleNotFoundError(f"No module named {name!r} (refused: serving runs without the trainer)")
            return None

    sys.meta_path.insert(0, RefuseTraining())
    try:
        import training
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("the finder did not refuse training")
""")
_NO_TRAINING_LOADED = "\nprint('training modules:', sorted(m for m in sys.modules if m.split('.')[0] == 'training'))\n"


def _run(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _REFUSE_TRAINING + textwrap.dedent(script) + _NO_TRAINING_LOADED],
                          capture_output=True, text=True, cwd=cwd, timeout=300, check=False)


def _phantom_nifti(path: Path) -> np.ndarray:
    """A small chest phantom as NIfTI (RAS affine from its LPS geometry); its label map, (x, y, z)."""
    phantom = generate_chest_phantom(PhantomConfig(shape=(24, 64, 64), spacing_mm=(10.0, 5.5, 5.5)), seed=3)
    dz, dy, dx = phantom.spacing_mm
    ox, oy, oz = phantom.origin_xyz_mm
    affine = np.array([[-dx, 0, 0, -ox], [0, -dy, 0, -oy], [0, 0, dz, oz], [0, 0, 0, 1]], dtype=float)
    nib.save(nib.Nifti1Image(phantom.volume_hu.transpose(2, 1, 0).astype(np.int16), affine), str(path))
    return phantom.labels.transpose(2, 1, 0)


@pytest.mark.slow
def test_the_segmentation_bundle_runs_with_monai_bundle_run_without_training(tmp_path: Path) -> None:
    (tmp_path / "data" / "imagesTs").mkdir(parents=True)
    truth = _phantom_nifti(tmp_path / "data" / "imagesTs" / "case.nii.gz")
    bundle = BUNDLES / "chest_ct_segmentation"
    # What `python -m monai.bundle run --config_file ... --bundle_root ... --dataset_dir ... --output_dir ...` does;
    # the bundle ships no data, so the datalist (dataset_dir/imagesTs/*.nii.gz) is given here.
    done = _run(f"""
        from monai.bundle import run
        run(run_id="run", config_file={str(bundle / "configs" / "inference.json")!r},
            meta_file={str(bundle / "configs" / "metadata.json")!r}, bundle_root={str(bundle)!r},
            dataset_dir={str(tmp_path / "data")!r}, output_dir={str(tmp_path / "out")!r},
            device="$torch.device('cpu')")
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "training modules: []" in done.stdout
    written = sorted((tmp_path / "out").rglob("*.nii.gz"))
    assert [p.name for p in written] == ["case_seg.nii.gz"], written
    labels = np.asarray(nib.load(str(written[0])).dataobj).squeeze()
    assert labels.shape == truth.shape  # inverted onto the source grid
    lung_truth, lung = truth == 2, labels == 2
    dice = 2 * (lung_truth & lung).sum() / (lung_truth.sum() + lung.sum())
    assert set(np.unique(labels)) <= {0, 1, 2, 3, 4, 5} and dice > 0.8, dice


def test_the_detection_bundle_builds_and_runs_its_network_without_training(tmp_path: Path) -> None:
    bundle = BUNDLES / "lung_nodule_detection"
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    # Nothing for `monai.bundle run` to run: workers.models.nodule_detector drives the network. Its
    # `postprocessing` is a description of the decoding (no _target_), so it is not instantiated here; its
    # `inferer` explains itself in MONAI's `_desc_` key, which ConfigParser leaves out of the arguments.
    assert "run" not in config and "_target_" not in config["postprocessing"] and "_desc_" in config["inferer"]
    image = tmp_path / "case.nii.gz"
    _phantom_nifti(image)
    done = _run(f"""
        import torch
        from monai.bundle import ConfigParser
        parser = ConfigParser()
        parser.read_config({str(bundle / "configs" / "inference.json")!r})
        parser.read_meta({str(bundle / "configs" / "metadata.json")!r})
        parser["bundle_root"] = {str(bundle)!r}
        parser["device"] = "$torch.device('cpu')"
        network = parser.get_parsed_content("network")
        state = torch.load({str(bundle / "models" / "model.pt")!r}, map_location="cpu", weights_only=True)
        network.load_state_dict(state.get("model", state) if "model" in state else state)
        image = parser.get_parsed_content("preprocessing")({{"image": {str(image)!r}}})["image"]
        inferer = parser.get_parsed_content("inferer")
        print("inferer:", type(inferer).__name__, list(inferer.roi_size))
        with torch.no_grad():
            out = network.eval()(image[None].float())
        outs = out if isinstance(out, (list, tuple)) else list(out.values()) if isinstance(out, dict) else [out]
        print("input:", tuple(image.shape), "outputs:", [tuple(o.shape) for o in outs])
    """, tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "training modules: []" in done.stdout
    assert "input: (1, 160, 160, 96) outputs: [(1, 7, 80, 80, 48)]" in done.stdout, done.stdout
    assert "inferer: SlidingWindowInferer [192, 192, 128]" in done.stdout, done.stdout
