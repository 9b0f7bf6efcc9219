"""The check before each model, from the header only, for jobs the router would create.

Why: an admin who tests a routing rule (the web rule tester, ``dicom-node rules test``) needs to
know not only which jobs the rule creates but whether each model would then run, or be declined
as not applicable (a chest model on a series whose header says head). Before a job exists the
node can read only the header; the worker decides again on the loaded volume with the image
survey, and where the image and the header disagree the image wins. Both front ends call
:func:`preview_applicability`, so they show the same decision, made by the worker's own
:func:`dicom_node.model_domain.decide` on the router's own :func:`dicom_node.routing.header_facts`.

No I/O beyond what the catalog reads (bundle ``metadata.json``): no pixels, no database.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

from dicom_node.model_catalog import ModelCatalog, UnknownModel
from dicom_node.model_domain import Applicability, InputDomain, SynonymTable, decide
from dicom_node.routing import JobSpec, StudyFacts, header_facts

__all__ = ["JobCheck", "preview_applicability"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobCheck:
    """One planned job and the header's verdict on it.

    ``domain`` and ``applicability`` are None when ``error`` says why the check could not be
    made (a model the registry does not list, an invalid declaration, a series not in the study).
    """

    spec: JobSpec
    domain: InputDomain | None
    applicability: Applicability | None
    error: str | None = None


def preview_applicability(catalog: ModelCatalog, synonyms: SynonymTable, facts: StudyFacts,
                          specs: Iterable[JobSpec]) -> list[JobCheck]:
    """For each job in ``specs`` (in order): its model's input domain and whether it applies to the
    job's series of ``facts``, judged from the header with ``synonyms``."""
    series_by_uid = {series.series_instance_uid: series for series in facts.series}
    checks = []
    for spec in specs:
        try:
            domain = catalog.input_domain(spec.pipeline)
        except (UnknownModel, ValueError) as exc:  # ModelRegistryError is a ValueError
            logger.info("job %s on %s: %s", spec.pipeline, spec.series_instance_uid, exc)
            checks.append(JobCheck(spec, None, None, str(exc)))
            continue
        series = series_by_uid.get(spec.series_instance_uid)
        if series is None:
            checks.append(JobCheck(spec, domain, None, f"series {spec.series_instance_uid} is not in study "
                                                        f"{facts.study_instance_uid}"))
            continue
        decision = decide(spec.pipeline, domain, header_facts(facts, series), synonyms=synonyms)
        checks.append(JobCheck(spec, domain, decision))
    return checks
