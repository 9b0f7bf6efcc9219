"""Checks that the TLS files a destination names are what they claim to be, before anything uses them.

Why: a ``ca_certificates`` that points at the wrong file (a key, a text file, a
directory, ``/dev/zero``) used to surface as an ``ssl.SSLError`` deep inside a sender,
and so as HTTP 500 from "Test connection" and a crashed delivery. These checks say
which field, which path and what is wrong, so the web app can refuse the definition
when it is saved (422 at the field) and senders can fail with a clear, permanent error.

Each check loads the file the way the senders do (the ``ssl`` module), after making
sure it is a regular file of sane size (a device or FIFO would block the reader), and
never asks for a key password: OpenSSL would prompt on the terminal and hang the
process, so an encrypted key is reported instead.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from dicom_node.destinations import Destination, DicomWebDestination, FhirDestination

__all__ = ["MAX_PEM_BYTES", "FieldProblem", "ca_bundle_problem", "client_certificate_problems",
           "destination_tls_problems", "no_key_password"]

#: A PEM bundle bigger than this is refused (the system bundle is about 200 KB).
MAX_PEM_BYTES = 10 * 1024 * 1024
#: A problem of one field: (location in the definition, message naming the field, the path and what is wrong).
FieldProblem = tuple[tuple[str, ...], str]


def no_key_password() -> bytes:
    """``password`` callback for ``load_cert_chain``: an encrypted key is an error, never a terminal prompt."""
    raise ValueError("the private key is encrypted; the node cannot use a key that needs a password")


def _file_problem(path: Path) -> str | None:
    try:
        if not path.exists():
            return "does not exist on the node"
        if not path.is_file():
            return "is not a regular file (a directory, device or pipe)"
        size = path.stat().st_size
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if size == 0:
        return "is empty"
    if size > MAX_PEM_BYTES:
        return f"is {size} bytes; a PEM file of at most {MAX_PEM_BYTES} bytes is expected"
    return None


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc).replace("_", " ").lower()


def ca_bundle_problem(path: Path) -> str | None:
    """What is wrong with ``path`` as a PEM bundle of CA certificates, or None if it loads."""
    problem = _file_problem(path)
    if problem is not None:
        return problem
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        return f"is not a PEM certificate bundle ({_ssl_reason(exc)})"
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    return None


def _key_problem(path: Path) -> str | None:
    problem = _file_problem(path)
    if problem is not None:
        return problem
    try:
        text = path.read_bytes()
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if b"ENCRYPTED" in text:
        return "is encrypted; the node cannot use a key that needs a password"
    if b"PRIVATE KEY-----" not in text:
        return "holds no PEM private key"
    return None


def client_certificate_problems(certificate: Path, private_key: Path, prefix: str = "") -> list[FieldProblem]:
    """Problems of a client certificate and its key (each file, then whether they belong together)."""
    problems: list[FieldProblem] = []
    certificate_problem = ca_bundle_problem(certificate)
    if certificate_problem is not None:
        certificate_problem = certificate_problem.replace("certificate bundle", "certificate")
        problems.append(((*_prefix_parts(prefix), "certificate"),
                         f"{prefix}certificate {certificate} {certificate_problem}"))
    key_problem = _key_problem(private_key)
    if key_problem is not None:
        problems.append(((*_prefix_parts(prefix), "private_key"), f"{prefix}private_key {private_key} {key_problem}"))
    if problems:
        return problems
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(certificate), str(private_key),
                                                                password=no_key_password)
    except (ssl.SSLError, ValueError, OSError) as exc:
        reason = _ssl_reason(exc) if isinstance(exc, ssl.SSLError) else str(exc)
        problems.append(((*_prefix_parts(prefix), "private_key"),
                         f"{prefix}certificate {certificate} and {prefix}private_key {private_key} cannot be used "
                         f"together ({reason})"))
    return problems


def _prefix_parts(prefix: str) -> tuple[str, ...]:
    """``"tls."`` -> ``("tls",)``: a message prefix as a field location."""
    return tuple(part for part in prefix.split(".") if part)


def destination_tls_problems(destination: Destination) -> list[FieldProblem]:
    """Every TLS file of ``destination`` that cannot be used, located at its field (``tls.ca_certificates``...)."""
    problems: list[FieldProblem] = []
    if isinstance(destination, (DicomWebDestination, FhirDestination)):
        if destination.ca_certificates is not None:
            problem = ca_bundle_problem(destination.ca_certificates)
            if problem is not None:
                problems.append((("ca_certificates",), f"ca_certificates {destination.ca_certificates} {problem}"))
        return problems
    tls = destination.tls
    if tls is None:
        return problems
    if tls.ca_certificates is not None:
        problem = ca_bundle_problem(tls.ca_certificates)
        if problem is not None:
            problems.append((("tls", "ca_certificates"), f"tls.ca_certificates {tls.ca_certificates} {problem}"))
    if tls.certificate is not None and tls.private_key is not None:
        problems.extend(client_certificate_problems(tls.certificate, tls.private_key, prefix="tls."))
    return problems
