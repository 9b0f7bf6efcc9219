"""Which of a job's result objects a destination receives, low-confidence variants included.

Why: a model's display threshold (``display_threshold`` in the registry) keeps its
low-confidence detections out of the GSPS and the overlay series by default, while a
destination may ask to see them outlined (``outline_low_confidence``). A job therefore
keeps, beside the default GSPS / SC, a variant with them outlined, of kind ``GSPS+LOW`` /
``SC+LOW`` (built only when there are such findings, see :mod:`workers.pipeline`). The
choice is made here at each send from the destination's current setting, so a re-send
after the setting changed follows it: a destination with ``outline_low_confidence`` gets
the variant in place of the default object of the same kind (the default when the job
has no variant); any other destination never gets a variant.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol, TypeVar

__all__ = ["LOW_VARIANT_SUFFIX", "base_kind", "low_variant", "select_results"]

#: Added to a result kind for its variant with low-confidence findings outlined ("GSPS+LOW").
LOW_VARIANT_SUFFIX = "+LOW"


class _Result(Protocol):
    @property
    def kind(self) -> str: ...


R = TypeVar("R", bound=_Result)


def low_variant(kind: str) -> str:
    """The kind of the variant of ``kind`` with low-confidence findings outlined: ``GSPS`` -> ``GSPS+LOW``."""
    return kind + LOW_VARIANT_SUFFIX


def base_kind(kind: str) -> str:
    """The destination output a result kind belongs to: ``GSPS+LOW`` -> ``GSPS``; others unchanged."""
    return kind.removesuffix(LOW_VARIANT_SUFFIX)


def select_results(results: Sequence[R], kinds: Collection[str], outline_low_confidence: bool) -> list[R]:
    """The ``results`` (of one job) of ``kinds`` (the destination's outputs, or what a delivery names) to send
    to a destination, with its ``outline_low_confidence`` setting deciding between default and variant (module
    docstring); in the given order."""
    present = {result.kind for result in results}
    chosen = []
    for result in results:
        base = base_kind(result.kind)
        if base not in kinds:
            continue
        if result.kind != base:  # a variant: only for destinations that outline, in place of the default
            if outline_low_confidence:
                chosen.append(result)
        elif not (outline_low_confidence and low_variant(base) in present):
            chosen.append(result)
    return chosen
