"""Moved to :mod:`workers.models.postprocessing` (serving never imports training); this name stays because
bundles exported before the move name ``training.postprocessing.DropSmallComponentsd`` as a target."""

from workers.models.postprocessing import DropSmallComponentsd

__all__ = ["DropSmallComponentsd"]
