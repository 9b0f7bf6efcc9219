"""URLs and header values built from data (UIDs, names): quoted here, in one place, and routed back intact.

Why: a Study or Series Instance UID should be digits and dots, but the node keeps what
modalities send, and the header parser shows undecodable bytes as U+FFFD. A UID with
``/``, ``?``, ``#``, ``%``, a space or a non-ASCII character must still give a working
link: every path segment made from data is percent-encoded completely
(:func:`path_segment`, also the templates' ``segment`` filter and ``study_url``), never
with Jinja's ``urlencode``, which leaves ``/`` alone.

An encoded slash (``%2F``) is decoded by the ASGI server before routing, so
``/studies/a%2Fb`` would reach the router as ``/studies/a/b``. Routers whose path
parameters carry such data use :class:`EncodedSlashRoute`, which matches requests with
an encoded slash against the raw path (one segment per parameter) and decodes each
parameter afterwards.

HTTP header values must be Latin-1 (Starlette encodes them so, and raises otherwise):
:func:`header_text` percent-encodes (UTF-8) anything outside printable ASCII.
"""

from __future__ import annotations

import string
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

__all__ = ["EncodedSlashRoute", "api_study_path", "header_text", "path_segment", "request_target", "study_path"]

#: Printable ASCII that may stay as it is in a header value ('%' is the escape character itself).
_HEADER_SAFE = "".join(c for c in string.printable if c not in "%\t\n\r\x0b\x0c")


def path_segment(value: str) -> str:
    """``value`` as one URL path segment: every character but letters, digits and ``_.-~`` percent-encoded."""
    return quote(value, safe="")


def study_path(study_instance_uid: str, tail: str = "") -> str:
    """The study page (``tail`` e.g. ``/live``, ``/preview.png``) of any UID."""
    return f"/studies/{path_segment(study_instance_uid)}{tail}"


def api_study_path(study_instance_uid: str, tail: str = "") -> str:
    """The study's REST resource (``tail`` e.g. ``/preview.png``) of any UID."""
    return f"/api/v1/studies/{path_segment(study_instance_uid)}{tail}"


def header_text(value: str) -> str:
    """``value`` fit for an HTTP header: unchanged if printable ASCII, else percent-encoded UTF-8 (RFC 3986)."""
    return quote(value, safe=_HEADER_SAFE)


def request_target(request: Request) -> str:
    """The path and query of ``request`` as the client sent them (still percent-encoded: ``%2F`` stays)."""
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) and raw else quote(request.url.path)
    return path + (f"?{request.url.query}" if request.url.query else "")


class EncodedSlashRoute(APIRoute):
    """An API route whose path parameters may contain ``/`` (sent as ``%2F``).

    A request whose raw path holds an encoded slash is matched on the raw path, where
    each parameter is exactly one segment, and its parameters are then percent-decoded
    (UTF-8; a parameter that is not valid UTF-8 matches nothing, so 404). Every other
    request is matched as usual.
    """

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        raw = scope.get("raw_path") if scope.get("type") == "http" else None
        if not isinstance(raw, bytes) or b"%2f" not in raw.lower():
            return super().matches(scope)
        encoded = raw.decode("latin-1")
        root = quote(scope.get("root_path", ""))
        if root and encoded.startswith(root):
            encoded = encoded[len(root):]
        match, child = super().matches({**scope, "path": encoded, "root_path": ""})
        if match is Match.NONE:
            return match, child
        params: dict[str, Any] = dict(child.get("path_params", {}))
        for name in self.param_convertors:
            value = params.get(name)
            if isinstance(value, str):
                try:
                    params[name] = unquote_to_bytes(value).decode("utf-8")
                except UnicodeDecodeError:
                    return Match.NONE, {}
        child["path_params"] = params
        return match, child
