"""3D chest CT segmentation: train the SegResNet, its nodule branch and small-nodule stage; export, evaluate.

Why: the node's segmentation worker serves a MONAI bundle; this package makes
one from a Decathlon-layout dataset and measures bundles the way they are served.

Modules (each importable on its own):

* :mod:`~training.segmentation.data` - the preprocessing config the bundle ships, the labelled cases, patches;
* :mod:`~training.segmentation.network` - the SegResNet's config, loading a bundle's network, prediction;
* :mod:`~training.segmentation.export` - the bundle's ``inference.json`` and metadata;
* :mod:`~training.segmentation.train` - :func:`train_segmentation` (the anatomy network);
* :mod:`~training.segmentation.nodule_branch` - :func:`train_nodule_branch` (the binary nodule stage);
* :mod:`~training.segmentation.small_nodules` - :func:`train_small_nodule_stage` (candidates under 6 mm);
* :mod:`~training.segmentation.evaluate` - :func:`evaluate_segmentation` (Dice and lesion-wise figures).
"""

from training.segmentation.data import DEFAULT_PATCH_SIZE, DEFAULT_SPACING_MM, DEFAULT_WINDOW_HU, preprocessing_config
from training.segmentation.evaluate import evaluate_segmentation
from training.segmentation.export import BODY_TISSUE_LABELS, INSIDE_BODY_LABELS, inference_config
from training.segmentation.network import network_def
from training.segmentation.nodule_branch import train_nodule_branch
from training.segmentation.small_nodules import train_small_nodule_stage
from training.segmentation.train import train_segmentation

__all__ = [
    "BODY_TISSUE_LABELS",
    "DEFAULT_PATCH_SIZE",
    "DEFAULT_SPACING_MM",
    "DEFAULT_WINDOW_HU",
    "INSIDE_BODY_LABELS",
    "evaluate_segmentation",
    "inference_config",
    "network_def",
    "preprocessing_config",
    "train_nodule_branch",
    "train_segmentation",
    "train_small_nodule_stage",
]
