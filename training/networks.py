"""Moved to :mod:`workers.models.segmentation_networks` (serving never imports training); this name stays
because bundles exported before the move name ``training.networks.AnatomyWithNoduleBranch`` as their target."""

from workers.models.segmentation_networks import AnatomyWithNoduleBranch

__all__ = ["AnatomyWithNoduleBranch"]
