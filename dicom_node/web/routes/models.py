"""The models page and API: the model registry, what each bundle says about itself, and where it is loaded.

:func:`model_catalog` reads the registry the workers use
(``routing.models_file``, or the built-in demo models) through the shared
:mod:`dicom_node.model_catalog` (never the workers' code, so neither torch nor
MONAI is imported here), and for each entry the bundle's ``configs/metadata.json``:
labels with their codes and colours, the input spacing and intensity window, and
the evaluation figures the training run wrote (``dicom_node.evaluation``, held-out
figures first). It never builds a network or loads weights - JSON, file sizes and
the SHA-256 of the weight files (the Device UID; hashed once per file version and
cached) - so the page is fast and safe to open while workers are busy. Each model
also shows the input it expects, the routing rules that name it and its version
history (:mod:`dicom_node.db.model_history`, written by ``dicom-node models add``). What each model declares
(:mod:`dicom_node.model_declarations`) is shown in words: what it was made for (a model that names
no body region is flagged: nothing keeps it off another region), the plausibility rules its results
must pass, and the series numbers its results arrive in. Each model's
load state comes from the heartbeats of the online workers
(:mod:`dicom_node.db.workers`). A broken entry or bundle shows its error in its own
row; an unreadable registry file shows one error and the page still renders.

Admins enable or disable a model here (:mod:`dicom_node.db.model_settings`, audited as
``model.enable`` / ``model.disable``): the router creates no job for a disabled model
and says so in the study's routing reasons; jobs already created keep running.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StrictBool

from dicom_node.db import config_repo, model_history, model_settings, workers
from dicom_node.db.models import Role
from dicom_node.model_catalog import (
    BundleLabel,
    ModelCatalog,
    metadata_labels,
    read_bundle_json,
)
from dicom_node.model_declarations import ResultSeries, model_declarations
from dicom_node.model_domain import InputDomain
from dicom_node.web.auth import Principal, audit_event, require
from dicom_node.web.context import WebContext, get_context
from dicom_node.web.pages import render
from dicom_node.web.routes.rules import FormData, submitted_form

__all__ = ["ModelOut", "ModelSettingIn", "ModelsOut", "model_catalog", "router", "set_model_enabled"]

logger = logging.getLogger(__name__)

router = APIRouter()


class LabelOut(BaseModel):
    value: int = Field(description="label value in the node's label map / SEG segment number")
    name: str
    code: str = Field(description="scheme:value of the coded concept, e.g. SCT:39607008")
    meaning: str
    category: str
    color_hex: str = Field(description="display colour, #rrggbb")


class FrocOut(BaseModel):
    """Detection sensitivity at average false positives per scan (FROC points) for one subset of nodules."""

    subset: str
    cpm: float | None = Field(None, description="competition performance metric: mean sensitivity over the points")
    references: int | None = Field(None, description="reference nodules in the subset")
    sensitivity_at: dict[str, float] = Field(description="false positives per scan -> sensitivity")


class EvaluationOut(BaseModel):
    split: str = Field(description="held_out (cases never seen in training), validation, or reported")
    cases: int | None = None
    dataset: str | None = None
    note: str | None = None
    figures: list[tuple[str, float]] = Field(description="(figure, value), e.g. ('Dice lung', 0.975)")
    froc: list[FrocOut] = []


class WorkerModelOut(BaseModel):
    worker: str
    state: str = Field(description="not loaded, loading, loaded or failed")
    device: str | None = None
    error: str | None = None


class RegistrationOut(BaseModel):
    """One registration of the model (``dicom-node models add``), newest first."""

    version: str
    format: str
    path: str
    device_uid: str
    weights_sha256: str
    registered_at: datetime
    registered_by: str


class ModelOut(BaseModel):
    id: str
    name: str
    kind: str
    format: str
    version: str
    path: str
    path_exists: bool
    weights: list[tuple[str, int]] = Field(description="(file, bytes) of the model files found")
    task: str | None = None
    description: str | None = None
    modality: str | None = None
    spacing_mm: list[float] | None = None
    window_hu: list[float] | None = None
    labels: list[LabelOut]
    evaluations: list[EvaluationOut]
    workers: list[WorkerModelOut] = Field(description="load state reported by each online worker")
    input_domain: InputDomain | None = Field(None, description="what the model was made for (None: unreadable)")
    made_for: str | None = Field(None, description="the input domain in one line, e.g. 'CT; chest; slices >= 10'")
    made_for_warning: str | None = Field(None, description="set when the model names no body region: nothing keeps "
                                                           "it off a series of another region")
    plausibility: dict[str, Any] | None = Field(None, description="the rules its results must pass before they are "
                                                                  "sent, as declared (None: no rules)")
    plausibility_summary: list[str] = Field([], description="each plausibility rule in words (empty: none)")
    result_series: list[ResultSeries] = Field([], description="the series its results arrive in")
    error: str | None = Field(None, description="why this entry, its bundle or its declarations cannot be used")
    enabled: bool = Field(True, description="false: an admin disabled the model; the router creates no job for it")
    note: str | None = Field(None, description="the admin's reason for the last enable/disable")
    updated_by: str | None = Field(None, description="who last enabled/disabled the model (None: never changed)")
    updated_at: datetime | None = Field(None, description="when the model was last enabled/disabled (UTC)")
    device_uid: str | None = Field(None, description="Device UID of the model's weights (from their SHA-256: the "
                                                     "same weights, the same UID); None when they cannot be read")
    inputs: list[tuple[str, str]] = Field([], description="(what, value) of the input it expects: preprocessing, "
                                                          "spacing, window, nnU-Net configuration")
    used_by_rules: list[str] = Field([], description="routing rules whose pipelines name this model")
    history: list[RegistrationOut] = Field([], description="its registrations, newest first")


class ModelSettingIn(BaseModel):
    """An admin's change of one model: enable or disable it, with an optional reason."""

    model_config = ConfigDict(extra="forbid")

    enabled: StrictBool = Field(description="true: the router may create jobs for the model; false: it creates none")
    note: str | None = Field(None, max_length=model_settings.NOTE_MAX,
                             description="why (shown on the models page and kept in the audit log)")


class ModelsOut(BaseModel):
    source: str = Field(description="the registry file, or the built-in demo models")
    error: str | None = Field(None, description="why the registry could not be read")
    models: list[ModelOut]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _evaluation(raw: Mapping[str, Any], split: str) -> EvaluationOut:
    """The figures of one ``dicom_node.evaluation`` block (validation or held_out), whatever the model kind."""
    figures: list[tuple[str, float]] = []
    dice = raw.get("dice")
    if isinstance(dice, Mapping):
        figures += [(f"Dice {name}", v) for name, value in dice.items() if (v := _number(value)) is not None]
    if (mean := _number(raw.get("mean_dice"))) is not None:
        figures.append(("Mean Dice", mean))
    # A lesion label absent from some cases: its Dice over the cases that have it (the usual lesion figure).
    with_label, counts = raw.get("dice_cases_with_label"), raw.get("cases_with_label")
    if isinstance(with_label, Mapping) and isinstance(counts, Mapping):
        figures += [(f"Dice {name}, {counts[name]} cases with {name}", v) for name, value in with_label.items()
                    if (v := _number(value)) is not None and isinstance(counts.get(name), int)
                    and counts[name] != raw.get("cases")]
    lesions = raw.get("lesions")
    if isinstance(lesions, Mapping):
        figures += [figure for name, block in lesions.items() if isinstance(block, Mapping)
                    for figure in _lesion_figures(str(name), block)]
    froc = []
    for subset in ("all", "large"):
        block = raw.get(subset)
        if isinstance(block, Mapping) and isinstance(block.get("sensitivity_at"), Mapping):
            label = subset
            if subset == "large" and (size := _number(raw.get("large_min_diameter_mm"))) is not None:
                label = f"nodules >= {size:g} mm"
            elif subset == "all":
                label = "all nodules"
            refs = block.get("n_references")
            froc.append(FrocOut(
                subset=label, cpm=_number(block.get("cpm")), references=refs if isinstance(refs, int) else None,
                sensitivity_at={str(k): v for k, value in block["sensitivity_at"].items()
                                if (v := _number(value)) is not None}))
    cases = raw.get("cases")
    return EvaluationOut(split=split, cases=cases if isinstance(cases, int) else None,
                         dataset=str(raw["dataset"]) if raw.get("dataset") else None,
                         note=str(raw["note"]) if raw.get("note") else None, figures=figures, froc=froc)


def _lesion_figures(name: str, block: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Lesion-wise figures of one label (``training.metrics.lesion_summary``): found and Dice per size band."""
    figures: list[tuple[str, float]] = []
    for band in block.get("size_bands") or []:
        if not isinstance(band, Mapping) or not isinstance(band.get("lesions"), int) or not band["lesions"]:
            continue
        if (sensitivity := _number(band.get("sensitivity"))) is not None:
            figures.append((f"Found, {name}s {band.get('band')} ({band['lesions']})", sensitivity))
        if (dice := _number(band.get("mean_dice"))) is not None:
            figures.append((f"Dice per {name}, {name}s {band.get('band')}", dice))
    if (false_positives := _number(block.get("false_positive_lesions_per_case"))) is not None:
        figures.append((f"False {name}s per case", false_positives))
    return figures


def _evaluations(meta: Mapping[str, Any]) -> list[EvaluationOut]:
    """Held-out figures first, then the validation split; Model Zoo bundles: their ``eval_metrics``."""
    section = (meta.get("dicom_node") or {}).get("evaluation")
    if isinstance(section, Mapping):
        found = []
        if isinstance(section.get("held_out"), Mapping):
            found.append(_evaluation(section["held_out"], "held_out"))
        found.append(_evaluation(section, str(section.get("split") or "validation")))
        return [e for e in found if e.figures or e.froc]
    reported = meta.get("eval_metrics")
    if isinstance(reported, Mapping):
        figures = [(str(k), v) for k, value in reported.items() if (v := _number(value)) is not None]
        if figures:
            return [EvaluationOut(split="reported", note="eval_metrics of the bundle metadata", figures=figures)]
    return []


def _label(label: BundleLabel) -> LabelOut:
    r, g, b = label.display_rgb
    return LabelOut(value=label.value, name=label.name, code=f"{label.code.scheme}:{label.code.value}",
                    meaning=label.code.meaning, category=label.category.meaning, color_hex=f"#{r:02x}{g:02x}{b:02x}")


def _weights(path: Path) -> list[tuple[str, int]]:
    if path.is_file():
        return [(path.name, path.stat().st_size)]
    folder = path / "models"
    if not folder.is_dir():
        return []
    return [(f.name, f.stat().st_size) for f in sorted(folder.iterdir()) if f.is_file()]


def _describe(registry: ModelCatalog, model_id: str, states: list[WorkerModelOut]) -> ModelOut:
    """One registry entry and its bundle's metadata; problems become ``error`` (never raised)."""
    entry = registry.entry(model_id)
    values: dict[str, Any] = {
        "id": entry.id, "name": entry.name or entry.id, "kind": entry.kind, "format": entry.format,
        "version": entry.version, "path": entry.path, "path_exists": False, "weights": [], "labels": [],
        "evaluations": [], "workers": states,
    }
    try:
        path = registry.path(model_id)
        values["path"] = str(path)
        values["path_exists"] = path.exists()
        if not path.exists():
            raise FileNotFoundError(f"model {model_id!r}: path {entry.path!r} ({path}) does not exist")
        values["weights"] = _weights(path)
        labels = list(entry.labels) if entry.labels else []
        if entry.preprocessing is not None:
            values["spacing_mm"] = list(entry.preprocessing.spacing_mm)
            values["window_hu"] = list(entry.preprocessing.window_hu)
        if entry.format == "monai_bundle":
            meta = read_bundle_json(path, "metadata.json")
            section = meta.get("dicom_node") or {}
            inputs = section.get("input") or {}
            values.update(
                name=entry.name or str(meta.get("name") or entry.id), task=meta.get("task"),
                description=meta.get("description"), modality=inputs.get("modality"),
                spacing_mm=inputs.get("spacing_mm"), window_hu=inputs.get("intensity_window_hu"),
                evaluations=_evaluations(meta),
            )
            found = meta.get("version")
            if found is not None and str(found) != entry.version:
                values["error"] = (f"registry says version {entry.version!r}, the bundle's metadata says "
                                   f"{str(found)!r}: workers refuse to load it")
            if not labels:
                labels = metadata_labels(meta, f"model {model_id!r}") or []
            if not labels:
                values["error"] = values.get("error") or (
                    f"model {model_id!r}: neither the registry entry nor the bundle metadata lists labels")
        values["labels"] = [_label(label) for label in sorted(labels, key=lambda x: x.value)]
    except Exception as exc:  # a broken bundle is shown in its row; the page must still render
        logger.info("model %s: %s", model_id, exc)
        values["error"] = str(exc)
    try:
        values["device_uid"] = registry.device_uid(model_id)
    except (ValueError, OSError) as exc:  # missing weights: the path error above says so
        logger.info("model %s: no Device UID: %s", model_id, exc)
    values["inputs"] = _inputs(entry, values)
    declared = model_declarations(registry, model_id)  # a bad declaration is its error, never an exception
    values.update({name: value for name, value in declared if name != "error"})
    if declared.error:
        values["error"] = "; ".join(filter(None, [values.get("error"), declared.error]))
    return ModelOut(**values)


def _inputs(entry: Any, values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The input a model expects, in words: how it is preprocessed (format-specific)."""
    found: list[tuple[str, str]] = []
    if entry.preprocessing is not None:
        pre = entry.preprocessing
        found += [("Sliding window", f"{' x '.join(map(str, pre.roi_size))} voxels, overlap {pre.overlap:g}, "
                                     f"batch {pre.sw_batch_size}")]
    if entry.nnunet is not None:
        options = entry.nnunet
        found += [("nnU-Net configuration", options.configuration),
                  ("Folds", ", ".join(map(str, options.folds)) + f" ({options.checkpoint})"),
                  ("Mirroring", "on" if options.use_mirroring else "off"),
                  ("Tile step", f"{options.tile_step_size:g}")]
    elif entry.format == "nnunet":
        found.append(("Preprocessing", "nnU-Net's own (plans.json)"))
    if entry.format == "monai_bundle":
        found.append(("Preprocessing", "the bundle's configs/inference.json"))
    return found


def _registry(context: WebContext) -> tuple[str, ModelCatalog | None, str | None]:
    """(source, registry or None, why it cannot be read): the registry the workers use."""
    models_file = context.settings.routing.models_file
    source = str(models_file) if models_file is not None else "built-in demo models (workers/bundles)"
    try:
        return source, ModelCatalog.configured(models_file), None
    except (ValueError, OSError) as exc:  # ModelRegistryError is a ValueError
        return source, None, str(exc)


def _setting_fields(setting: model_settings.ModelSettingView) -> dict[str, Any]:
    return {"enabled": setting.enabled, "note": setting.note, "updated_by": setting.updated_by,
            "updated_at": setting.updated_at}


def model_catalog(context: WebContext) -> ModelsOut:
    """The registry the workers use, each entry described from its files, with the online workers' load states
    and the admins' enabled/disabled setting."""
    source, registry, error = _registry(context)
    if registry is None:
        return ModelsOut(source=source, error=error, models=[])
    settings = model_settings.model_settings(context.sessions)
    online = [w for w in workers.list_workers(context.sessions, now=context.clock(),
                                              stale_seconds=context.settings.web.worker_stale_seconds) if w.online]
    uses: dict[str, list[str]] = {}
    for rule in config_repo.list_rules(context.sessions):
        for pipeline in dict.fromkeys(rule.pipelines):
            uses.setdefault(pipeline, []).append(rule.name)
    history = model_history.history(context.sessions)
    models = []
    for model_id in registry.ids:
        states = [
            WorkerModelOut(worker=w.name, state=str(s.get("state") or "unknown"), device=s.get("device"),
                           error=s.get("error"))
            for w in online if (s := w.models.get(model_id)) is not None
        ]
        described = _describe(registry, model_id, states)
        models.append(described.model_copy(update=_setting_fields(model_settings.setting_of(settings, model_id)) | {
            "used_by_rules": uses.get(model_id, []),
            "history": [RegistrationOut(**{k: v for k, v in r.as_dict().items() if k in RegistrationOut.model_fields})
                        for r in history.get(model_id, [])]}))
    return ModelsOut(source=source, models=models)


def _require_registered(context: WebContext, model_id: str) -> None:
    """404 unless ``model_id`` is an entry of the registry (a setting for an unknown id would mean nothing)."""
    source, registry, error = _registry(context)
    if registry is None or model_id not in registry.ids:
        raise HTTPException(404, f"no model {model_id[:80]!r} in {source}" + (f" ({error})" if error else ""))


def set_model_enabled(context: WebContext, request: Request, principal: Principal, model_id: str, enabled: bool,
                      note: str | None) -> model_settings.ModelSettingView:
    """Enable or disable a registry model and audit it; the page and the API both call this.

    404 for a model not in the registry; ValueError (from the db) names a note that is too long.
    """
    _require_registered(context, model_id)
    before, after = model_settings.set_model_enabled(context.sessions, model_id, enabled, note=note,
                                                     by=principal.username, now=context.clock())
    audit_event(context, request, principal, "model.enable" if enabled else "model.disable", target_kind="model",
                target=model_id, before=before.audit_state(), after=after.audit_state())
    return after


#: How the page names the evaluation splits.
_SPLIT_NAMES = {"held_out": "Held-out test set", "validation": "Validation", "reported": "Reported by the bundle"}


def _figure_grid(evaluations: list[EvaluationOut]) -> dict[str, Any]:
    """The scalar figures of all splits side by side: columns = splits with figures, rows = figure names."""
    columns = [e for e in evaluations if e.figures]
    names: list[str] = []
    for evaluation in columns:
        names += [name for name, _ in evaluation.figures if name not in names]
    rows = [(name, [dict(e.figures).get(name) for e in columns]) for name in names]
    return {"columns": columns, "rows": rows}


_DONE = {"enabled": "Model {} enabled: the router creates jobs for it again.",
         "disabled": "Model {} disabled: the router creates no new job for it; queued jobs keep running."}


def _models_page(request: Request, context: WebContext, *, message: str | None = None,
                 form_errors: Mapping[str, str] | None = None, notes: Mapping[str, str] | None = None,
                 status_code: int = 200) -> Response:
    catalog = model_catalog(context)
    return render(request, "models.html", status_code=status_code, catalog=catalog, split_names=_SPLIT_NAMES,
                  grids={m.id: _figure_grid(m.evaluations) for m in catalog.models}, message=message,
                  form_errors=form_errors or {}, notes=notes or {}, note_max=model_settings.NOTE_MAX)


@router.get("/models", include_in_schema=False)
def models_page(request: Request, done: str = Query(""), model: str = Query("", max_length=64),
                principal: Principal = Depends(require(Role.VIEWER)),
                context: WebContext = Depends(get_context)) -> Response:
    message = _DONE[done].format(model) if done in _DONE and model else None
    return _models_page(request, context, message=message)


def _toggle_from_form(request: Request, context: WebContext, principal: Principal, model_id: str, enabled: bool,
                      form: FormData) -> Response:
    note = (form.get("note") or [""])[0]
    try:
        set_model_enabled(context, request, principal, model_id, enabled, note)
    except ValueError as exc:  # the note is too long: the page again, the note as typed, the error at it
        return _models_page(request, context, form_errors={model_id: str(exc)}, notes={model_id: note},
                            status_code=422)
    done = "enabled" if enabled else "disabled"
    return RedirectResponse(f"/models?done={done}&model={quote(model_id, safe='')}#model-{quote(model_id)}",
                            status_code=303)


@router.post("/models/{model_id}/enable", include_in_schema=False)
def enable_model_submit(request: Request, model_id: str, form: FormData = Depends(submitted_form),
                        principal: Principal = Depends(require(Role.ADMIN)),
                        context: WebContext = Depends(get_context)) -> Response:
    return _toggle_from_form(request, context, principal, model_id, True, form)


@router.post("/models/{model_id}/disable", include_in_schema=False)
def disable_model_submit(request: Request, model_id: str, form: FormData = Depends(submitted_form),
                         principal: Principal = Depends(require(Role.ADMIN)),
                         context: WebContext = Depends(get_context)) -> Response:
    return _toggle_from_form(request, context, principal, model_id, False, form)


@router.get("/api/v1/models", response_model=ModelsOut, tags=["models"])
def models_api(principal: Principal = Depends(require(Role.VIEWER)),
               context: WebContext = Depends(get_context)) -> ModelsOut:
    """The model registry: per model what it was made for (input domain), the plausibility rules its results must
    pass, its result series, labels, input, evaluation figures, files and load state on each worker."""
    return model_catalog(context)


@router.get("/api/v1/models/{model_id}", response_model=ModelOut, tags=["models"],
            responses={404: {"description": "no such model in the registry"}})
def model_api(model_id: str, principal: Principal = Depends(require(Role.VIEWER)),
              context: WebContext = Depends(get_context)) -> ModelOut:
    """One model of the registry (404 if it is not listed)."""
    catalog = model_catalog(context)
    for model in catalog.models:
        if model.id == model_id:
            return model
    raise HTTPException(404, f"no model {model_id!r} in {catalog.source}"
                        + (f" ({catalog.error})" if catalog.error else ""))


_PUT_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such model in the registry"},
    422: {"description": "invalid body: enabled must be true or false, note at most 500 characters"},
}


@router.put("/api/v1/models/{model_id}", response_model=ModelOut, tags=["models"], responses=_PUT_ERRORS)
def put_model_api(model_id: str, body: ModelSettingIn, request: Request,
                  principal: Principal = Depends(require(Role.ADMIN)),
                  context: WebContext = Depends(get_context)) -> ModelOut:
    """Enable or disable one model of the registry (admin). A disabled model gets no new job from the router
    (the study's routing reasons say so); jobs already created keep running. Audited as model.enable/model.disable."""
    try:
        set_model_enabled(context, request, principal, model_id, body.enabled, body.note)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from exc
    return model_api(model_id, principal, context)
