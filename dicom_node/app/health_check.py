"""``dicom-node serve --check`` and ``dicom-node worker --check``: is the process of this machine alive?

Why: container health checks (Docker ``HEALTHCHECK``, Kubernetes exec probes) and
scripts need a yes/no that asks the running process itself, with the same settings
it runs on (so the port, the monitoring port and the health token are the ones
in force), without a shell, curl or a second copy of the settings in the probe.

* The node: ``GET /readyz`` on its monitoring listener (``web.ops_host``:``web.ops_port``)
  when it has one, else on the admin app (``web.host``:``web.port``), with
  ``web.health_token`` when set; ready is HTTP 200 (the database answers at the right
  schema revision and the DICOM listener runs).
* A worker: a Celery ``ping`` over the broker (``queue.broker_url``) to the workers of
  this host, whatever queues they consume (their Celery names are
  ``<queues>@<host>``, :func:`workers.celery_app.worker_nodename`); alive is one reply
  within the timeout. This is an answer from the worker's consumer, not only a
  process that exists.

Neither touches the database itself nor creates anything.
"""

from __future__ import annotations

import json
import logging
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass

from dicom_node.settings import Settings

__all__ = ["CheckResult", "check_node", "check_worker", "node_ready_url"]

logger = logging.getLogger(__name__)

#: Seconds each check waits for its answer (a Docker health check's own timeout should be longer).
CHECK_TIMEOUT_SECONDS = 5.0
#: Addresses that mean "every interface": the check connects to the loopback address instead.
_ANY_ADDRESS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


@dataclass(frozen=True)
class CheckResult:
    """The outcome of a check: ``ok`` and one line that says what was asked and what answered."""

    ok: bool
    detail: str


def node_ready_url(settings: Settings) -> str:
    """The ``/readyz`` URL of the node these settings describe, as seen from its own machine."""
    web = settings.web
    host, port = (web.ops_host or web.host, web.ops_port) if web.ops_port is not None else (web.host, web.port)
    host = _ANY_ADDRESS.get(host, host)
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"http://{host}:{port}/readyz"


def check_node(settings: Settings, timeout: float = CHECK_TIMEOUT_SECONDS) -> CheckResult:
    """Ask the running node's ``/readyz``: ok on HTTP 200; else the status and the checks that failed."""
    if not settings.web.enabled:
        return CheckResult(False, "web.enabled is false: the node serves no /readyz to ask")
    url = node_ready_url(settings)
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if settings.web.health_token:
        request.add_header("Authorization", f"Bearer {settings.web.health_token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - an http:// URL we built
            return CheckResult(True, f"{url}: {response.status} {_summary(response.read())}")
    except urllib.error.HTTPError as exc:  # 503 not ready, 401 wrong token
        return CheckResult(False, f"{url}: {exc.code} {_summary(exc.read())}")
    except (urllib.error.URLError, OSError) as exc:  # refused, timed out: no node listening
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return CheckResult(False, f"{url}: no answer ({reason})")


def _summary(body: bytes) -> str:
    """``ready``, or ``not ready: <check>: <detail>; ...`` from a /readyz body; the raw start of anything else."""
    try:
        data = json.loads(body)
        failed = [f"{c['name']}: {c['detail']}" for c in data.get("checks", []) if not c.get("ok")]
        return str(data["status"]) + (": " + "; ".join(failed) if failed else "")
    except (ValueError, KeyError, TypeError, AttributeError):
        return body[:200].decode("utf-8", "replace")


def check_worker(settings: Settings, timeout: float = CHECK_TIMEOUT_SECONDS, host: str | None = None) -> CheckResult:
    """Ping the ``dicom-node worker`` processes of ``host`` (default: this machine) over the broker."""
    from kombu.exceptions import OperationalError

    from workers.celery_app import local_worker_nodenames, make_celery_app

    broker = settings.queue.broker_url
    if broker.startswith("memory:"):
        return CheckResult(False, "queue.broker_url is memory://: only the serve process itself can reach its "
                           "workers (check the node with `dicom-node serve --check`)")
    names = local_worker_nodenames(host or socket.gethostname())
    app = make_celery_app(broker)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
            replies = app.control.ping(destination=names, timeout=timeout, limit=1, connection=connection)
    except (OperationalError, OSError) as exc:
        return CheckResult(False, f"broker {_without_password(broker)} not reachable: {exc}")
    answered = sorted(name for reply in replies for name in reply)
    if not answered:
        return CheckResult(False, f"no worker of {names[0].partition('@')[2]} answered a ping within {timeout:g} s "
                           f"(asked {', '.join(names)} on {_without_password(broker)})")
    return CheckResult(True, f"{', '.join(answered)} answered")


def _without_password(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return str(maybe_sanitize_url(url))
