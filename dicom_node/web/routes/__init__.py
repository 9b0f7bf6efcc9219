"""The app's routers: one module per area; each route states the least role it needs via ``require``."""

from __future__ import annotations

from fastapi import APIRouter

from dicom_node.web.routes import (
    audit_log,
    dashboard,
    destinations,
    dicomweb,
    login,
    models,
    outbox_upload,
    rules,
    studies,
    study_actions,
    study_record,
    users,
)

#: Every router of the admin app (the monitoring router, ``ops``, is added separately).
ROUTERS: tuple[APIRouter, ...] = (
    login.router,
    dashboard.router,
    studies.router,
    study_actions.router,
    study_record.router,
    rules.router,
    destinations.router,
    models.router,
    audit_log.router,
    users.router,
    dicomweb.router,
    outbox_upload.router,
)
