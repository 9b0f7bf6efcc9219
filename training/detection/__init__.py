"""3D lung nodule detection: train, export and evaluate the CenterNet detector.

Why: the node's detection worker runs a MONAI bundle that reports lung nodules
as boxes with a confidence. The network, its configuration, pre-processing and
decoding are what the worker serves, so they live in
:mod:`workers.models.detection_network`; this package adds what training needs:

* :mod:`~training.detection.loss` - CenterNet targets and loss;
* :mod:`~training.detection.data` - cases on the network grid, the patch sampler;
* :mod:`~training.detection.train` - :func:`train_detection` (with hard-negative mining);
* :mod:`~training.detection.export` - the bundle's ``network_def``, ``inference.json`` and metadata;
* :mod:`~training.detection.evaluate` - FROC of a bundle on a dataset (:func:`evaluate_detection`).

``CenterNetDetector`` stays importable here: bundles exported before the network
moved to :mod:`workers.models` name ``training.detection.CenterNetDetector`` as
their ``network_def`` target, and load where this package is installed.
"""

from training.detection.data import DetectionCase, case_from_volume, load_detection_cases
from training.detection.evaluate import evaluate_detection
from training.detection.export import inference_config, network_def
from training.detection.loss import Heads, centernet_loss, centernet_targets
from training.detection.train import train_detection
from workers.models.detection_network import CenterNetDetector

__all__ = [
    "CenterNetDetector",
    "DetectionCase",
    "Heads",
    "case_from_volume",
    "centernet_loss",
    "centernet_targets",
    "evaluate_detection",
    "inference_config",
    "load_detection_cases",
    "network_def",
    "train_detection",
]
