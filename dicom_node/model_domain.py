"""What a model was made for (its input domain), and whether a series is inside it.

Why: the most dangerous thing the node can do is run a chest model on a head CT and
send confident findings on the wrong anatomy. Every model therefore declares what it
can see (:class:`InputDomain`: modalities, body regions from a small coded vocabulary,
coverage, slice count, spacing, thickness, orientation, contrast), and every series is
checked before a model runs, from two independent signals:

* the DICOM header (:func:`header_regions`: BodyPartExamined, Study/Series Description,
  Protocol Name, matched against a multilingual synonym table admins can extend), and
* the image itself (the workers' body-region survey, reduced to :class:`ImageRegions`).

:func:`decide` combines them: when the two disagree the image wins, and the decision
keeps the evidence of both (for the study's timeline and ``dicom-node rules test``).
This module is pure (no I/O, no numpy) so the node's router, web pages and CLI and the
workers all use the same rules.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from dicom_node.contracts import CodedConcept

__all__ = [
    "BODY_REGIONS",
    "REGION_CODES",
    "Applicability",
    "BodyRegion",
    "Check",
    "HeaderFacts",
    "HeaderRegions",
    "ImageRegions",
    "InputDomain",
    "NumberRange",
    "SynonymTable",
    "decide",
    "default_synonyms",
    "header_regions",
]

#: The controlled vocabulary of body regions a model can be made for (DICOM CID 4031 codes).
BodyRegion = Literal["head", "neck", "chest", "abdomen", "pelvis", "extremities", "whole_body"]
BODY_REGIONS: tuple[BodyRegion, ...] = ("head", "neck", "chest", "abdomen", "pelvis", "extremities", "whole_body")
REGION_CODES: dict[str, CodedConcept] = {
    "head": CodedConcept(value="69536005", scheme="SCT", meaning="Head"),
    "neck": CodedConcept(value="45048000", scheme="SCT", meaning="Neck"),
    "chest": CodedConcept(value="51185008", scheme="SCT", meaning="Chest"),
    "abdomen": CodedConcept(value="818981001", scheme="SCT", meaning="Abdomen"),
    "pelvis": CodedConcept(value="816092008", scheme="SCT", meaning="Pelvis"),
    "extremities": CodedConcept(value="66019005", scheme="SCT", meaning="Extremity"),
    "whole_body": CodedConcept(value="38266002", scheme="SCT", meaning="Entire body"),
}
Orientation = Literal["axial", "sagittal", "coronal", "oblique"]

#: Words (and short phrases) that name body regions in headers, in several languages, upper-case
#: ASCII (accents are removed before matching). BodyPartExamined defined terms (PS3.16 Annex L)
#: that span regions (CHESTABDPELVIS, HEADNECK, ...) name each region they span.
_DEFAULT_SYNONYMS: dict[str, tuple[str, ...]] = {
    "head": (
        "HEAD", "BRAIN", "SKULL", "CRANIUM", "CRANIAL", "CEREBRAL", "CCT", "CT HEAD", "HEADNECK", "HEAD NECK",
        "KOPF", "SCHADEL", "SCHAEDEL", "HIRN", "TETE", "CRANE", "CERVEAU", "CABEZA", "CRANEO", "CEREBRO",
        "TESTA", "CRANIO", "ENCEFALO", "CABECA", "HOOFD", "HERSENEN", "SINUS", "SINUSES", "ORBIT", "ORBITS",
        "IAC", "PETROUS", "FACE", "FACIAL", "MAXILLOFACIAL", "MANDIBLE",
    ),
    "neck": (
        "NECK", "HEADNECK", "HEAD NECK", "CSPINE", "C SPINE", "CERVICAL SPINE", "LARYNX", "THYROID", "HALS",
        "HWS", "COU", "CUELLO", "COLLO", "PESCOCO", "NEK", "SOFT TISSUE NECK",
    ),
    "chest": (
        "CHEST", "THORAX", "THORACIC", "LUNG", "LUNGS", "PULMONARY", "PULMO", "HEART", "CARDIAC", "CORONARY",
        "CHESTABDOMEN", "CHESTABDPELVIS", "CAP", "TAP", "CTA CHEST", "PE", "CTPA", "TSPINE", "T SPINE",
        "THORAKS", "BRUST", "BRUSTKORB", "LUNGE", "LUNGEN", "THORAKAL", "HERZ", "POITRINE", "POUMON", "POUMONS",
        "TORAX", "TORACICO", "TORACICA", "PULMON", "PULMONES", "TORACE", "POLMONE", "POLMONI", "PULMAO",
        "PULMOES", "BORST", "BROSTKORG", "LUNGOR", "KLATKA PIERSIOWA", "PLUCA",
    ),
    "abdomen": (
        "ABDOMEN", "ABD", "ABDOMINAL", "ABDOMENPELVIS", "CHESTABDOMEN", "CHESTABDPELVIS", "CAP", "TAP",
        "LIVER", "PANCREAS", "KIDNEY", "KIDNEYS", "RENAL", "LSPINE", "L SPINE", "BAUCH", "LEBER", "NIERE",
        "NIEREN", "VENTRE", "FOIE", "ABDOMEN SUPERIEUR", "HIGADO", "ADDOME", "FEGATO", "BUIK",
        "BRZUCH",
    ),
    "pelvis": (
        "PELVIS", "PELVIC", "ABDOMENPELVIS", "CHESTABDPELVIS", "CAP", "TAP", "BLADDER", "PROSTATE", "HIP",
        "HIPS", "SACRUM", "BECKEN", "BASSIN", "PELVIEN", "PELVIENNE", "PELVIS MENOR", "PELVE", "BACINO", "BEKKEN",
        "MIEDNICA",
    ),
    "extremities": (
        "EXTREMITY", "EXTREMITIES", "ARM", "LEG", "LEGS", "KNEE", "ANKLE", "FOOT", "FEET", "HAND", "HANDS",
        "WRIST", "ELBOW", "SHOULDER", "FEMUR", "TIBIA", "HUMERUS", "FOREARM", "UPPER EXTREMITY",
        "LOWER EXTREMITY", "BEIN", "KNIE", "FUSS", "SCHULTER", "GENOU", "PIED", "EPAULE",
        "RODILLA", "MANO", "HOMBRO", "GINOCCHIO", "PIEDE", "SPALLA", "JOELHO",
    ),
    "whole_body": (
        "WHOLEBODY", "WHOLE BODY", "WB", "TOTAL BODY", "POLYTRAUMA", "GANZKORPER", "GANZKOERPER",
        "CORPS ENTIER", "CUERPO ENTERO", "CORPO INTERO", "CORPO INTEIRO",
    ),
}

#: Header fields read for the body region, in the order their evidence is shown.
HEADER_FIELDS = ("body_part_examined", "protocol_name", "series_description", "study_description")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NumberRange(_Strict):
    """An inclusive range; either bound optional."""

    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> NumberRange:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def describe(self) -> str:
        if self.min is not None and self.max is not None:
            return f"{self.min:g}-{self.max:g}"
        if self.min is not None:
            return f">= {self.min:g}"
        return f"<= {self.max:g}" if self.max is not None else "any"


class InputDomain(_Strict):
    """What a model can see: a series outside this is never given to it.

    Empty tuples and None mean "no constraint". ``body_regions``: the model applies when
    the series shows at least one of them. ``complete_coverage``: the landmark organ of
    those regions must lie wholly in the field of view (both lungs for chest, the skull
    for head), not cut by the first or last slice or the image edge. ``slices`` counts
    the slices of the volume (frames of a multi-frame instance, not instances).
    ``pixel_spacing_mm`` is the in-plane spacing, ``slice_spacing_mm`` the distance
    between slices, ``slice_thickness_mm`` the reconstructed thickness. ``contrast``:
    ``with`` needs a ContrastBolusAgent in the header, ``without`` needs none.
    """

    modalities: tuple[str, ...] = ()
    body_regions: tuple[BodyRegion, ...] = ()
    complete_coverage: bool = False
    slices: NumberRange = NumberRange()
    pixel_spacing_mm: NumberRange = NumberRange()
    slice_spacing_mm: NumberRange = NumberRange()
    slice_thickness_mm: NumberRange = NumberRange()
    orientations: tuple[Orientation, ...] = ()
    contrast: Literal["any", "with", "without"] = "any"

    @field_validator("modalities")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(v.strip().upper() for v in value)

    def describe(self) -> str:
        """One line for people: "CT; chest (complete); 10+ slices; axial"."""
        parts = ["/".join(self.modalities) or "any modality"]
        if self.body_regions:
            parts.append("/".join(self.body_regions) + (" (complete)" if self.complete_coverage else ""))
        for name, limits in (("slices", self.slices), ("pixel spacing mm", self.pixel_spacing_mm),
                             ("slice spacing mm", self.slice_spacing_mm),
                             ("slice thickness mm", self.slice_thickness_mm)):
            if limits.min is not None or limits.max is not None:
                parts.append(f"{name} {limits.describe()}")
        if self.orientations:
            parts.append("/".join(self.orientations))
        if self.contrast != "any":
            parts.append(f"{self.contrast} contrast")
        return "; ".join(parts)


class HeaderFacts(_Strict):
    """What the header of a series says, as the applicability check reads it."""

    modality: str | None = None
    body_part_examined: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    slices: int | None = None
    pixel_spacing_mm: float | None = None
    slice_spacing_mm: float | None = None
    slice_thickness_mm: float | None = None
    orientation: Orientation | None = None
    contrast_agent: str | None = None


class SynonymTable:
    """Header words that name body regions: the built-in table plus what admins add.

    ``extra``: ``{region: [word, ...]}`` (settings ``applicability.header_synonyms``);
    words are matched whole, case- and accent-insensitive; a word may name several regions.
    """

    def __init__(self, extra: Mapping[str, Iterable[str]] | None = None) -> None:
        table: dict[str, set[str]] = {region: set(words) for region, words in _DEFAULT_SYNONYMS.items()}
        for region, words in (extra or {}).items():
            if region not in BODY_REGIONS:
                raise ValueError(f"header synonyms: unknown body region {region!r} (known: {', '.join(BODY_REGIONS)})")
            for word in words:
                normal = _normalise(str(word))
                if not normal:
                    raise ValueError(f"header synonyms: {word!r} for {region} has no letters or digits")
                table[region].add(normal)
        self._phrases: list[tuple[str, str]] = sorted(
            ((_normalise(word), region) for region, words in table.items() for word in words),
            key=lambda item: (-len(item[0]), item),
        )

    def regions_in(self, text: str) -> list[tuple[str, str]]:
        """``[(region, word)]`` for every synonym found as whole words in ``text``."""
        padded = f" {_normalise(text)} "
        found = []
        for phrase, region in self._phrases:
            if f" {phrase} " in padded:
                found.append((region, phrase))
        return found


def default_synonyms() -> SynonymTable:
    """The built-in synonym table (no admin additions)."""
    return SynonymTable()


def _normalise(text: str) -> str:
    """Upper-case ASCII words separated by single spaces ("Tórax/ABD." -> "TORAX ABD")."""
    decomposed = unicodedata.normalize("NFKD", text)
    ascii_text = "".join(c for c in decomposed if not unicodedata.combining(c)).upper()
    return " ".join(re.split(r"[^A-Z0-9]+", ascii_text)).strip()


class HeaderRegions(_Strict):
    """The body regions a series' header names, with the words that named them."""

    regions: tuple[BodyRegion, ...]
    evidence: tuple[str, ...]

    @property
    def silent(self) -> bool:
        return not self.regions


def header_regions(facts: HeaderFacts, synonyms: SynonymTable | None = None) -> HeaderRegions:
    """Which body regions the header names (empty when it names none)."""
    table = synonyms or default_synonyms()
    found: dict[str, None] = {}
    evidence = []
    for field in HEADER_FIELDS:
        value = getattr(facts, field)
        if not value:
            continue
        hits = table.regions_in(str(value))
        if hits:
            words = sorted({word for _, word in hits})
            regions = sorted({region for region, _ in hits}, key=BODY_REGIONS.index)
            evidence.append(f"{field} {str(value)[:64]!r}: {', '.join(words)} -> {', '.join(regions)}")
            for region in regions:
                found[region] = None
    ordered = tuple(r for r in BODY_REGIONS if r in found)
    return HeaderRegions(regions=ordered, evidence=tuple(evidence))  # type: ignore[arg-type]


class ImageRegions(_Strict):
    """What the image itself shows (from the workers' body-region survey).

    ``regions``: the body regions the volume covers; ``complete``: the regions whose
    landmark organ lies wholly in the field of view; ``evidence``: one line per finding
    (lungs 2.1 L at z -250..-20 mm, skull ring on 40 slices, ...); ``seconds``: its cost.
    ``available`` False (with ``evidence`` saying why) when the image cannot be judged
    (not a CT, too few slices).
    """

    available: bool = True
    regions: tuple[BodyRegion, ...] = ()
    complete: tuple[BodyRegion, ...] = ()
    evidence: tuple[str, ...] = ()
    seconds: float = 0.0


class Check(_Strict):
    """One criterion of a decision: its name, whether it held (None: could not be judged) and why."""

    name: str
    passed: bool | None
    detail: str


#: Reason codes of a declined model (also the codes of the "AI analysis not performed" SR).
ReasonCode = Literal[
    "modality", "body-region", "coverage", "slices", "spacing", "thickness", "orientation", "contrast",
]


class Applicability(_Strict):
    """Whether a model applies to a series, why, and the evidence of both signals."""

    model_id: str
    applies: bool
    reason_code: ReasonCode | None = None
    reason: str | None = None
    header_regions: tuple[BodyRegion, ...] = ()
    image_regions: tuple[BodyRegion, ...] | None = None
    checks: tuple[Check, ...] = ()
    seconds: float = 0.0

    def summary(self) -> str:
        """One line for the timeline: "applies: ..." or "not applicable: <reason>"."""
        if self.applies:
            seen = self.image_regions if self.image_regions is not None else self.header_regions
            return f"{self.model_id} applies ({', '.join(seen) or 'no region constraint'})"
        return f"{self.model_id} not applicable: {self.reason}"

    def as_record(self) -> dict[str, Any]:
        """JSON-able form for the job's record."""
        return self.model_dump(mode="json")


def _range_check(name: str, code: ReasonCode, limits: NumberRange, value: float | None,
                 unit: str) -> tuple[Check, ReasonCode | None]:
    if limits.min is None and limits.max is None:
        return Check(name=name, passed=True, detail="no constraint"), None
    if value is None:
        return Check(name=name, passed=None, detail=f"unknown (model needs {limits.describe()}{unit})"), None
    ok = limits.holds(value)
    detail = f"{value:g}{unit} {'within' if ok else 'outside'} {limits.describe()}{unit}"
    return Check(name=name, passed=ok, detail=detail), None if ok else code


def decide(
    model_id: str,
    domain: InputDomain,
    facts: HeaderFacts,
    *,
    header: HeaderRegions | None = None,
    image: ImageRegions | None = None,
    synonyms: SynonymTable | None = None,
    seconds: float = 0.0,
) -> Applicability:
    """Does ``model_id`` (made for ``domain``) apply to the series these facts describe?

    ``facts`` come from the header (the router's view) or from the loaded volume (the
    worker's view: slices counted as frames, spacing from the geometry). ``image``: the
    image's own regions, when the survey ran. Region rule: when the image was judged its
    regions decide (a header that disagrees is noted, not believed); otherwise the
    header's; a header that names no region and no image judgement leaves the region
    unknown, which declines a model that needs a region (when in doubt, do not run).
    The first failing criterion gives ``reason_code`` and ``reason``.
    """
    header = header if header is not None else header_regions(facts, synonyms)
    checks: list[Check] = []
    failures: list[tuple[ReasonCode, str]] = []

    def note(check: Check, code: ReasonCode | None) -> None:
        checks.append(check)
        if code is not None:
            failures.append((code, f"{check.name}: {check.detail}"))

    if domain.modalities:
        modality = (facts.modality or "").upper() or None
        ok = modality in domain.modalities
        note(Check(name="modality", passed=ok, detail=f"{modality or 'none'} "
                   f"{'is' if ok else 'is not'} {'/'.join(domain.modalities)}"), None if ok else "modality")
    note(*_range_check("slices", "slices", domain.slices, facts.slices, ""))
    note(*_range_check("pixel spacing", "spacing", domain.pixel_spacing_mm, facts.pixel_spacing_mm, " mm"))
    note(*_range_check("slice spacing", "spacing", domain.slice_spacing_mm, facts.slice_spacing_mm, " mm"))
    note(*_range_check("slice thickness", "thickness", domain.slice_thickness_mm, facts.slice_thickness_mm, " mm"))
    if domain.orientations:
        ok = facts.orientation in domain.orientations
        note(Check(name="orientation", passed=ok if facts.orientation else None,
                   detail=f"{facts.orientation or 'unknown'}; model needs {'/'.join(domain.orientations)}"),
             None if ok or facts.orientation is None else "orientation")
    if domain.contrast != "any":
        has = bool((facts.contrast_agent or "").strip())
        ok = has == (domain.contrast == "with")
        note(Check(name="contrast", passed=ok, detail=(f"ContrastBolusAgent {facts.contrast_agent!r}" if has else
                                                        "no ContrastBolusAgent") + f"; model needs {domain.contrast}"),
             None if ok else "contrast")
    _region_checks(domain, header, image, note)
    code, reason = failures[0] if failures else (None, None)
    return Applicability(
        model_id=model_id, applies=not failures, reason_code=code, reason=reason,
        header_regions=header.regions,
        image_regions=image.regions if image is not None and image.available else None,
        checks=tuple(checks), seconds=round(seconds + (image.seconds if image is not None else 0.0), 4),
    )


def _region_checks(domain: InputDomain, header: HeaderRegions, image: ImageRegions | None, note: Any) -> None:
    wanted = set(domain.body_regions)
    header_text = "; ".join(header.evidence) or "names no body region"
    note(Check(name="header regions", passed=None if header.silent else bool(wanted & set(header.regions))
               if wanted else True, detail=header_text), None)
    if image is not None:
        image_text = "; ".join(image.evidence) or "no evidence"
        note(Check(name="image regions", passed=(bool(wanted & set(image.regions)) if wanted else True)
                   if image.available else None,
                   detail=(f"{', '.join(image.regions) or 'none found'}: " if image.available else "") + image_text),
             None)
    if not wanted:
        return
    need = "/".join(sorted(wanted, key=BODY_REGIONS.index))
    if image is not None and image.available:
        seen = set(image.regions)
        if "whole_body" in wanted and {"head", "chest", "abdomen", "pelvis"} <= seen:
            seen.add("whole_body")
        if not wanted & seen:
            disagree = f" (the header says {', '.join(header.regions)}; the image wins)" if header.regions else ""
            note(Check(name="body region", passed=False,
                       detail=f"the image shows {', '.join(image.regions) or 'no known region'}, "
                              f"the model is made for {need}{disagree}"), "body-region")
            return
        if header.regions and not wanted & set(header.regions):
            detail = (f"the image shows {', '.join(sorted(wanted & seen, key=BODY_REGIONS.index))} although the "
                      f"header says {', '.join(header.regions)}: the image wins")
        else:
            detail = f"the image shows {', '.join(sorted(wanted & seen, key=BODY_REGIONS.index))}"
        note(Check(name="body region", passed=True, detail=detail), None)
        if domain.complete_coverage:
            complete = wanted & seen & set(image.complete)
            note(Check(name="coverage", passed=bool(complete),
                       detail=(f"{', '.join(sorted(complete))} wholly in the field of view" if complete else
                               f"{need} not wholly in the field of view")), None if complete else "coverage")
        return
    if header.silent:
        why = image.evidence[0] if image is not None and image.evidence else "the image was not judged"
        note(Check(name="body region", passed=False,
                   detail=f"unknown: the header names no body region and {why}; the model is made for {need}"),
             "body-region")
        return
    ok = bool(wanted & set(header.regions))
    note(Check(name="body region", passed=ok,
               detail=f"the header says {', '.join(header.regions)}; the model is made for {need} "
                      "(the image was not judged)"), None if ok else "body-region")

