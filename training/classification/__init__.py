"""Series-level classification: the demo "lung nodule present?" classifier (:mod:`.nodule_presence`).

Why: the node serves classification bundles (class probabilities and an
explanation map); this package trains and exports the small one that shows
that path on chest phantoms.
"""
