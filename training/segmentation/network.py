"""The segmentation network: its MONAI config, loading a bundle's network, whole-volume prediction.

Why: the SegResNet is built from the config the bundle ships (``network_def``),
so the trained network and the served one are the same class with the same
arguments; :func:`load_bundle` reads a bundle the way MONAI's bundle API does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.segmentation.data import plain

__all__ = ["load_bundle", "network_def", "predict_labels"]


def network_def(*, out_channels: int, init_filters: int = 8, dropout_prob: float | None = None) -> dict[str, Any]:
    """MONAI config of the SegResNet (the bundle's ``network_def``); ``init_filters`` a multiple of 8 (GroupNorm)."""
    if init_filters < 8 or init_filters % 8:
        raise ValueError(f"init_filters must be a positive multiple of 8 (SegResNet's 8 norm groups), got {init_filters}")
    config: dict[str, Any] = {
        "_target_": "SegResNet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": int(out_channels),
        "init_filters": int(init_filters),
        "blocks_down": [1, 2, 2, 4],
        "blocks_up": [1, 1, 1],
    }
    if dropout_prob:
        config["dropout_prob"] = float(dropout_prob)
    return config


def load_bundle(bundle_dir: Path, device: torch.device) -> tuple[Any, torch.nn.Module]:
    """The bundle's ConfigParser (bundle_root, device set) and its network with models/model.pt loaded."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle_dir / "configs" / "inference.json"))
    parser.read_meta(str(bundle_dir / "configs" / "metadata.json"))
    parser["bundle_root"] = str(bundle_dir)
    parser["device"] = f"$torch.device({str(device)!r})"
    network = parser.get_parsed_content("network")
    state = torch.load(bundle_dir / "models" / "model.pt", map_location=device, weights_only=True)
    if isinstance(state.get("model"), Mapping):  # a CheckpointSaver-style {"model": state_dict}
        state = state["model"]
    network.load_state_dict(state)
    network.eval()
    return parser, network


@torch.no_grad()
def predict_labels(network: torch.nn.Module, image: torch.Tensor, inferer: Any, dev: torch.device, use_amp: bool) -> np.ndarray:
    """Argmax label map (x, y, z) of a channel-first preprocessed image."""
    network.eval()
    with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
        logits = inferer(plain(image)[None].to(dev), network)
    return logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
