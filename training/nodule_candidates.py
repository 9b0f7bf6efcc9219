"""Moved to :mod:`workers.models.small_nodules` (serving never imports training); this name stays because
bundles exported before the move name ``training.nodule_candidates.SmallNoduleStage`` as a target."""

from workers.models.small_nodules import SmallNoduleStage

__all__ = ["SmallNoduleStage"]
