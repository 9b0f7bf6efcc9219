"""One HTTP request to a destination's server (DICOMweb STOW-RS, FHIR): credentials, TLS, errors in words.

Why shared: STOW-RS (:mod:`dicom_node.stow`) and FHIR notifications (:mod:`dicom_node.notify`)
reach servers configured alike (service root, basic or bearer auth, ``verify_tls``,
``ca_certificates``) and must judge failures alike: no answer, a refused connection or a
time-out is retryable; an untrusted certificate or a failed TLS handshake is not; an HTTP
answer, whatever its status, is returned for the caller to judge (5xx, 408 and 429 are
retryable, :data:`RETRYABLE_HTTP`, with the ``Retry-After`` hint). The standard library is
enough (urllib + ssl). Redirects are never followed.
"""

from __future__ import annotations

import base64
import email.utils
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from http.client import HTTPResponse
from typing import Any

from dicom_node.delivery_types import DeliveryError
from dicom_node.destinations import BasicAuth, BearerAuth, DicomWebDestination, FhirDestination

__all__ = ["BODY_EXCERPT", "RETRYABLE_HTTP", "HttpDestination", "NoRedirect", "excerpt", "exchange", "retry_after",
           "ssl_context", "with_auth"]

#: A destination reached over HTTP(S).
HttpDestination = DicomWebDestination | FhirDestination
#: 4xx statuses worth trying again (request time-out, too many requests); every 5xx is too.
RETRYABLE_HTTP = frozenset({408, 429})
BODY_EXCERPT = 300


class NoRedirect(urllib.request.HTTPRedirectHandler):
    """Turn every redirect into an HTTPError: a POST redirected to a GET would look like success."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def with_auth(destination: HttpDestination, headers: dict[str, str]) -> dict[str, str]:
    """``headers`` plus the destination's Authorization header, if it has credentials."""
    auth = destination.auth
    if isinstance(auth, BasicAuth):
        token = base64.b64encode(f"{auth.username}:{auth.password.get_secret_value()}".encode()).decode("ascii")
        headers["Authorization"] = f"Basic {token}"
    elif isinstance(auth, BearerAuth):
        headers["Authorization"] = f"Bearer {auth.token.get_secret_value()}"
    return headers


def ssl_context(destination: HttpDestination) -> ssl.SSLContext | None:
    if not destination.url.startswith("https:"):
        return None
    if not destination.verify_tls:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    cafile = str(destination.ca_certificates) if destination.ca_certificates is not None else None
    return ssl.create_default_context(cafile=cafile)


def retry_after(headers: Message | None) -> float | None:
    """The ``Retry-After`` header in seconds (delta-seconds or an HTTP date), if any."""
    value = headers.get("Retry-After") if headers is not None else None
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def excerpt(body: bytes) -> str:
    """The start of a response body on one line, for error messages."""
    text = body[:BODY_EXCERPT].decode("utf-8", "replace")
    text = " ".join(text.split())
    return text + ("..." if len(body) > BODY_EXCERPT else "")


def exchange(
    destination: HttpDestination, request: urllib.request.Request, error: Callable[..., DeliveryError]
) -> tuple[int, Message | None, bytes]:
    """Send ``request``; (HTTP status, headers, body), HTTP errors included. DeliveryError when no answer came."""
    handlers: list[urllib.request.BaseHandler] = [NoRedirect()]
    try:
        context = ssl_context(destination)
    except (OSError, ssl.SSLError) as exc:  # a wrong ca_certificates file: permanent, name the path
        problem = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else (exc.strerror or exc)
        raise error(f"cannot load ca_certificates {destination.ca_certificates}: {problem}", retryable=False) from exc
    if context is not None:
        handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)
    try:
        response: HTTPResponse = opener.open(request, timeout=destination.timeout_seconds)
        with response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.headers, exc.read()
        except OSError:
            return exc.code, exc.headers, b""
        finally:
            exc.close()
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ssl.SSLCertVerificationError):
            message = f"the server's TLS certificate is not trusted: {reason.verify_message}"
            raise error(message, retryable=False) from exc
        if isinstance(reason, ssl.SSLError):
            raise error(f"TLS handshake failed: {reason.reason or reason}", retryable=False) from exc
        if isinstance(reason, ConnectionRefusedError):
            raise error("connection refused (nothing listening, or a firewall)", retryable=True) from exc
        if isinstance(reason, TimeoutError):
            raise error(f"no answer within {destination.timeout_seconds:g} s", retryable=True) from exc
        raise error(f"cannot reach the server: {reason}", retryable=True) from exc
    except TimeoutError as exc:
        raise error(f"no answer within {destination.timeout_seconds:g} s", retryable=True) from exc
    except OSError as exc:  # reset or closed while sending or reading
        raise error(f"the connection failed: {exc}", retryable=True) from exc
