"""The deploy files (deploy/: Dockerfiles, compose file, Helm chart, systemd units, README) work with this code.

What can be checked without pulling a base image or having a cluster, and is checked here:

* every ``dicom-node`` command line in them names commands and flags that the real parser
  (:func:`dicom_node.app.cli.build_parser`) has, and parses where it is written out in full;
* every ``DICOM_NODE_*`` variable in them is a setting, and the environment the compose
  file and the rendered chart give each container loads as valid settings;
* the files pass their own tools: ``hadolint`` (Dockerfiles), ``docker-compose config``
  (Docker Compose v2), Helm's own render and ``lint --strict`` (the Helm 4 library), the
  rendered objects against the Kubernetes API schemas (``kubernetes-validate --strict``),
  ``systemd-analyze verify`` (units). The tools live in a venv of their own,
  ``/opt/dicom-node-deploy-tools`` (``tests/install-peers.sh``); without it these tests
  skip, except under CI, where they fail.

Not checked here (no registry, no GPU runtime, no cluster on these machines): building
the images and running them, scheduling on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from dicom_node.app.cli import NODE_COMMANDS, build_parser
from dicom_node.settings import Settings, load_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
CHART = DEPLOY / "helm" / "dicom-node"
DOCKERFILES = sorted(DEPLOY.glob("*.Dockerfile"))
UNITS = sorted(DEPLOY.glob("*.service"))
TOOLS = Path(os.environ.get("DICOM_NODE_DEPLOY_TOOLS", "/opt/dicom-node-deploy-tools"))
#: Variables named DICOM_NODE_ that are not settings: where the settings file is.
NOT_SETTINGS = {"DICOM_NODE_CONFIG"}
#: Stands for a value the file leaves to Helm or to the shell: its flag is checked, the value is not.
PLACEHOLDER = "VALUE"


def deploy_files() -> list[Path]:
    """Every file under deploy/ that can hold a command line or a setting."""
    files = [p for p in sorted(DEPLOY.rglob("*")) if p.is_file() and p.suffix not in {".pyc"}]
    assert {p.name for p in files} >= {"node.Dockerfile", "worker.Dockerfile", "compose.yaml", "values.yaml",
                                       "dicom-node.service", "dicom-node-worker.service", "README.md"}
    return files


@dataclass(frozen=True)
class Invocation:
    """A ``dicom-node`` command line found in a deploy file."""

    where: str
    argv: tuple[str, ...]
    #: What a program runs (an exec-form array, a unit's ExecStart), not a mention in a comment or a document.
    executed: bool = False

    @property
    def concrete(self) -> bool:
        """Run as written (no Helm template or shell variable in it): the parser must accept it whole."""
        return self.executed and not any(PLACEHOLDER in a or "$" in a for a in self.argv)


#: ``["dicom-node", "worker", "--queues", {{ .Values.worker.queues | quote }}]`` (JSON / YAML flow / exec form).
_ARRAY = re.compile(r'\[\s*"(?:/[\w./-]*/bin/)?dicom-node"\s*(?:,\s*(?:"[^"\n]*"|\{\{[^}\n]*\}\})\s*)*\]')
#: ``dicom-node serve --config ...`` or ``/opt/dicom-node/venv/bin/dicom-node worker ...`` on a command line;
#: not the value of an option (``install -o dicom-node``, ``sudo -u dicom-node``) nor a path (``/var/lib/dicom-node``).
_SHELL = re.compile(r"(?<![\w./-])(?<!-[a-zA-Z] )(?:/[\w./-]*/bin/)?dicom-node[ \t]+([^\n]*)")
#: Where a command line ends in a shell line or in prose.
_SHELL_END = re.compile(r"\|\||&&|[|;<>`')(\"#\\]|\{\{|\s-\s|:\s")
_MARKDOWN_CODE = re.compile(r"```[a-z]*\n(.*?)```|`([^`\n]+)`", re.S)


def _template_values(text: str) -> str:
    return re.sub(r'"?\{\{[^}\n]*\}\}"?', f'"{PLACEHOLDER}"', text)


def invocations_in(text: str, where: str) -> Iterator[Invocation]:
    """The ``dicom-node`` command lines of ``text``: exec-form arrays, and command lines in shell form.

    A name followed by a word that is not a command-line token (``dicom-node 0.1.0``,
    a template) is not a command line; a lowercase word after it always is, so prose
    in these files does not write "dicom-node <word>" unless the word is a command.
    """
    for match in _ARRAY.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        argv = json.loads(_template_values(match.group(0)))
        yield Invocation(f"{where}:{line}", tuple(argv[1:]), executed=True)
    rest = _ARRAY.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)  # the same lines, arrays blanked
    for match in _SHELL.finditer(rest):
        line_start = rest.rfind("\n", 0, match.start()) + 1
        words = _SHELL_END.split(match.group(1), maxsplit=1)[0]
        try:
            argv = [a.rstrip(",.") for a in shlex.split(words)]
        except ValueError:
            argv = words.split()
        if argv and re.fullmatch(r"[a-z][a-z-]*|--?[a-z][\w-]*(=\S*)?", argv[0]):
            yield Invocation(f"{where}:{text.count(chr(10), 0, match.start()) + 1}", tuple(a for a in argv if a),
                             executed=rest.startswith("ExecStart=", line_start))


def all_invocations() -> list[Invocation]:
    found: list[Invocation] = []
    for path in deploy_files():
        text = path.read_text(encoding="utf-8")
        where = path.relative_to(REPO_ROOT).as_posix()
        if path.suffix == ".md":  # prose: only what is written as code (the rest blanked; lines and backticks kept)
            code = re.sub(r"[^\n`]", " ", text)
            for match in _MARKDOWN_CODE.finditer(text):
                start, end = match.span(1 if match.group(1) is not None else 2)
                code = code[:start] + text[start:end] + code[end:]
            text = code
        found.extend(invocations_in(text, where))
    return found


def _subcommands(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def problems_of(argv: tuple[str, ...]) -> list[str]:
    """What in ``argv`` the real ``dicom-node`` parser does not have: a command, a flag, a value it refuses."""
    parser = build_parser(training=not argv or argv[0] not in NODE_COMMANDS)
    problems: list[str] = []
    current, path, index = parser, ["dicom-node"], 0
    while index < len(argv):
        word = argv[index]
        index += 1
        if word.startswith("-"):
            flag = word.split("=", 1)[0]
            action = current._option_string_actions.get(flag)
            if action is None:
                problems.append(f"{' '.join(path)} has no option {flag}")
            elif action.nargs != 0 and "=" not in word:
                index += 1  # its value
            continue
        subcommands = _subcommands(current)
        if subcommands is not None:
            if word not in subcommands.choices:
                problems.append(f"{' '.join(path)} has no command {word!r}")
                return problems
            current = subcommands.choices[word]
            path.append(word)
    last = _subcommands(current)
    if last is not None and last.required:
        problems.append(f"{' '.join(path)} needs a command")
    return problems


def parse_problem(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str | None:
    """The parser's own error for a command line written out in full, or None when it parses."""
    parser = build_parser(training=argv[0] not in NODE_COMMANDS)
    try:
        parser.parse_args(list(argv))
    except SystemExit as exc:
        error = capsys.readouterr().err.strip().splitlines()
        return f"exit {exc.code}: {error[-1] if error else ''}"
    return None


def test_the_extractor_finds_command_lines_and_their_mistakes() -> None:
    text = ('CMD ["dicom-node", "worker", "--queues", {{ .Values.q | quote }}, "--no-such-flag"]\n'
            "ExecStart=/opt/dicom-node/venv/bin/dicom-node serve --config /etc/dicom-node/node.yaml\n"
            "# install dicom-node 0.1.0; home /var/lib/dicom-node; user dicom-node\n"
            "RUN install -o dicom-node -g dicom-node -m 0750 /var/lib/dicom-node && sudo -u dicom-node true\n"
            "HEALTHCHECK CMD dicom-node serev --check || exit 1\n")
    found = {(i.argv, i.executed) for i in invocations_in(text, "x")}
    assert found == {(("worker", "--queues", PLACEHOLDER, "--no-such-flag"), True),
                     (("serve", "--config", "/etc/dicom-node/node.yaml"), True), (("serev", "--check"), False)}
    assert problems_of(("worker", "--queues", PLACEHOLDER, "--no-such-flag")) == [
        "dicom-node worker has no option --no-such-flag"]
    assert problems_of(("serev", "--check")) == ["dicom-node has no command 'serev'"]
    assert problems_of(("db",)) == ["dicom-node db needs a command"]
    assert problems_of(("users", "create", "alice", "--role", "admin")) == []


def test_every_dicom_node_command_line_in_the_deploy_files_exists(capsys: pytest.CaptureFixture[str]) -> None:
    found = all_invocations()
    commands = {(i.argv[0], *(["--check"] if "--check" in i.argv else [])) for i in found}
    # The ones the images, the chart and the units are built on must be among those found (the extractor works).
    assert {("serve",), ("serve", "--check"), ("worker",), ("worker", "--check"), ("users",), ("tokens",),
            ("db",)} <= commands, commands
    problems = [f"{i.where}: dicom-node {' '.join(i.argv)}: {p}" for i in found for p in problems_of(i.argv)]
    problems += [f"{i.where}: dicom-node {' '.join(i.argv)}: {p}" for i in found
                 if i.concrete and not problems_of(i.argv) and (p := parse_problem(i.argv, capsys))]
    assert not problems, "\n".join(problems)


def setting_paths(model: type[BaseModel] = Settings, prefix: str = "") -> set[str]:
    """Every setting as its environment variable name: ``DICOM_NODE_DICOM__TLS__ENABLED`` ..."""
    names: set[str] = set()
    for name, field in model.model_fields.items():
        path = f"{prefix}{name.upper()}"
        names.add(f"DICOM_NODE_{path}")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            names |= setting_paths(annotation, f"{path}__")
    return names


def test_every_dicom_node_variable_in_the_deploy_files_is_a_setting() -> None:
    known = setting_paths()
    assert {"DICOM_NODE_DATA_DIR", "DICOM_NODE_QUEUE__BROKER_URL", "DICOM_NODE_WEB__PORT"} <= known
    used: dict[str, str] = {}
    for path in deploy_files():
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for name in re.findall(r"\bDICOM_NODE_[A-Z0-9_]*[A-Z0-9]", line):
                used.setdefault(name, f"{path.relative_to(REPO_ROOT).as_posix()}:{number}")
    assert len(used) >= 10, used
    unknown = {name: where for name, where in used.items() if name not in known | NOT_SETTINGS}
    assert not unknown, f"not settings (docs/configuration.md): {unknown}"


def assert_loads_as_settings(environment: dict[str, str], where: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process started with ``environment`` (and no settings file) would run on."""
    for name in [n for n in os.environ if n.startswith("DICOM_NODE_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        if name.startswith("DICOM_NODE_"):
            monkeypatch.setenv(name, value)
    try:
        return load_settings(None)
    except Exception as exc:  # a ValidationError names each bad setting
        pytest.fail(f"{where}: the environment does not load as settings: {exc}")


# --- the tools' own checks -------------------------------------------------------------------------------------


def tool(name: str, *, system: bool = True) -> Path:
    """A program of the deploy tools venv (or, with ``system``, of the system), else skip - or fail under CI."""
    candidates = [TOOLS / "bin" / name] + ([Path(shutil.which(name) or "/nonexistent")] if system else [])
    for candidate in candidates:
        if candidate.exists():
            return candidate
    what = name if system else f"{name} of the deploy tools venv (with helm-python-sdk)"
    message = f"{what} not installed (tests/install-peers.sh installs it into {TOOLS})"
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def run(argv: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=120, **kwargs)


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    result = run([tool("hadolint"), "--no-color", dockerfile])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfiles_are_non_root_with_health_checks_and_pinned_torch() -> None:
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text(encoding="utf-8")
        last_user = re.findall(r"^USER\s+(\S+)", text, re.M)[-1]
        assert last_user.split(":")[0] not in ("root", "0"), dockerfile.name
        assert re.search(r'^HEALTHCHECK .*CMD \["dicom-node", "(serve|worker)", "--check"\]', text, re.M), dockerfile
        assert "torch==2.13.0" in text, dockerfile.name
    assert "whl/cpu" in (DEPLOY / "node.Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:", (DEPLOY / "worker.Dockerfile").read_text(), re.M)


def compose_config(*args: str) -> dict[str, Any]:
    """``docker-compose config`` of deploy/compose.yaml, resolved by Docker Compose itself (JSON)."""
    result = run([tool("docker-compose"), "--project-directory", DEPLOY, "-f", DEPLOY / "compose.yaml", *args,
                  "config", "--format", "json"], env={**os.environ, "POSTGRES_PASSWORD": "pw"})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_compose_file_is_valid_and_its_settings_load(monkeypatch: pytest.MonkeyPatch) -> None:
    config = compose_config("--profile", "two-gpus")
    services = config["services"]
    assert set(services) == {"postgres", "redis", "node", "worker-gpu0", "worker-gpu1"}
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0] for s in services.values() if "deploy" in s]
    assert [(d["driver"], d["device_ids"], d["capabilities"]) for d in gpus] == [
        ("nvidia", ["0"], ["gpu"]), ("nvidia", ["1"], ["gpu"])]
    node = assert_loads_as_settings(services["node"]["environment"], "compose node", monkeypatch)
    assert node.queue.embedded_worker_queues == ["io"] and node.queue.broker_url == "redis://redis:6379/0"
    assert node.resolved_database_url.startswith("postgresql+psycopg://dicom_node:pw@postgres:5432/")
    worker = assert_loads_as_settings(services["worker-gpu0"]["environment"], "compose worker", monkeypatch)
    assert worker.worker.node_access == "http" and worker.worker.node_url == "http://node:8080"
    assert worker.resolved_database_url == node.resolved_database_url
    assert set(compose_config()["services"]) == {"postgres", "redis", "node", "worker-gpu0"}  # no profile: 1 GPU


#: Renders the chart with the Helm 4 library of the tools venv: values as JSON on stdin, manifests as JSON out.
_HELM = """
import json, sys
from helm_python import chart
request = json.load(sys.stdin)
loaded = chart.Chart.load(request["chart"])
try:
    out = {"manifests": loaded.render(values=request["values"], name="dn", namespace="pacs"),
           "lint": chart.lint(request["chart"], values=request["values"], strict=True)}
except Exception as exc:  # the values refused (values.schema.json, a `required`): Helm's message
    out = {"refused": str(exc)}
json.dump(out, sys.stdout)
"""


def helm_output(values: dict[str, Any]) -> dict[str, Any]:
    result = run([tool("python", system=False), "-c", _HELM], input=json.dumps({"chart": str(CHART), "values": values}))
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(json.loads(result.stdout))


#: Kubernetes versions the rendered objects must be valid for (strict: no field the API does not have).
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")


def helm(values: dict[str, Any], tmp_path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The chart's objects rendered by Helm with ``values``, checked against the Kubernetes API schemas
    (kubernetes-validate --strict), and Helm's strict lint report."""
    out = helm_output(values)
    assert "refused" not in out, out["refused"]
    manifests = {name: text for name, text in sorted(out["manifests"].items()) if name.endswith(".yaml")}
    folder = tmp_path / f"rendered-{len(list(tmp_path.glob('rendered-*')))}"
    folder.mkdir()
    for name, text in manifests.items():
        if text.strip():
            (folder / Path(name).name).write_text(text, encoding="utf-8")
    for version in KUBERNETES_VERSIONS:
        checked = run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version,
                       *sorted(folder.iterdir())])
        assert checked.returncode == 0, checked.stdout + checked.stderr
    objects = [doc for text in manifests.values() for doc in yaml.safe_load_all(text) if doc]
    return objects, out["lint"]


def test_the_schema_check_finds_a_field_kubernetes_does_not_have(tmp_path: Path) -> None:
    wrong = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
             "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                 "metadata": {"labels": {"a": "b"}},
                 "spec": {"terminationGracePeriod": 60, "containers": [{"name": "c", "image": "i"}]}}}}
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump(wrong), encoding="utf-8")
    result = run([tool("kubernetes-validate"), "--strict", "--quiet", tmp_path / "wrong.yaml"])
    assert result.returncode != 0 and "terminationGracePeriod" in result.stdout + result.stderr


def _container_environment(container: dict[str, Any], objects: list[dict[str, Any]]) -> dict[str, str]:
    """The environment of a rendered container: its ConfigMaps, then its env, values from the chart's Secrets."""
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        environment.update(by_name[("ConfigMap", source["configMapRef"]["name"])]["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = str(variable["value"])
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            environment[variable["name"]] = by_name[("Secret", ref["name"])]["stringData"][ref["key"]]
    return environment


def test_helm_chart_renders_lints_and_its_settings_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # First install: built-in PostgreSQL and Redis, no worker token yet - so no workers.
    objects, lint = helm({"postgresql": {"password": "pw"}}, tmp_path)
    assert not lint["errors"] and all(m["severity"] < 2 for m in lint["messages"]), lint
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert ("StatefulSet", "dn-dicom-node-node") in kinds and not any(k == "Deployment" and n.endswith("-worker")
                                                                       for k, n in kinds)

    # External PostgreSQL and Redis, a worker token, three workers.
    objects, lint = helm({"postgresql": {"enabled": False}, "redis": {"enabled": False},
                          "brokerUrl": "redis://redis.infra:6379/3",
                          "secrets": {"databaseUrl": "postgresql+psycopg://u:p@db.infra:5432/dicom_node",
                                      "workerToken": "dnt_example"},
                          "worker": {"replicas": 3}}, tmp_path)
    assert not lint["errors"], lint
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert not any(name.endswith(("-postgresql", "-redis")) for _, name in by_kind)
    node_set = by_kind[("StatefulSet", "dn-dicom-node-node")]
    assert node_set["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    node_container = node_set["spec"]["template"]["spec"]["containers"][0]
    workers = by_kind[("Deployment", "dn-dicom-node-worker")]
    assert workers["spec"]["replicas"] == 3
    worker_container = workers["spec"]["template"]["spec"]["containers"][0]
    assert worker_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker_container["livenessProbe"]["exec"]["command"] == ["dicom-node", "worker", "--check"]
    for container in (node_container, worker_container):  # the probes' and commands' flags exist
        assert not problems_of(tuple(container["command"][1:])), container["command"]
        assert container["securityContext"]["runAsNonRoot"] is True

    node = assert_loads_as_settings(_container_environment(node_container, objects), "chart node", monkeypatch)
    assert node.queue.broker_url == "redis://redis.infra:6379/3" and node.queue.embedded_worker_queues == ["io"]
    assert node.resolved_database_url == "postgresql+psycopg://u:p@db.infra:5432/dicom_node"
    assert str(node.data_dir) == "/var/lib/dicom-node" and node.web.host == "0.0.0.0"
    worker = assert_loads_as_settings(_container_environment(worker_container, objects), "chart worker",
                                      monkeypatch)
    assert worker.worker.node_access == "http" and worker.worker.node_url == "http://dn-dicom-node-web:8080"
    assert worker.worker.token == "dnt_example"
    assert by_kind[("Service", "dn-dicom-node-web")]["spec"]["ports"][0]["port"] == node.web.port


@pytest.mark.parametrize(("values", "message"), [
    ({"postgresql": {"password": "pw"}, "worker": {"replica": 2}}, "additional properties 'replica' not allowed"),
    ({"postgresql": {"password": "pw"}, "settings": {"dicom_port": "104"}}, "invalid propertyName 'dicom_port'"),
    ({"postgresql": {"password": "pw"}, "brokerUrl": "amqp://broker"}, "does not match pattern"),
    ({}, "postgresql.password is required"),
    ({"postgresql": {"enabled": False}}, "secrets.databaseUrl (or secrets.existingSecret) is required"),
], ids=["misspelt key", "not a DICOM_NODE_ variable", "not a Redis URL", "no password", "no database"])
def test_helm_chart_refuses_wrong_values_by_name(values: dict[str, Any], message: str) -> None:
    refused = helm_output(values).get("refused", "")
    assert message in refused, refused or "rendered"


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_units_verify(unit: Path, tmp_path: Path) -> None:
    """``systemd-analyze verify`` says nothing (unknown keys and bad values are warnings it prints); the
    program path is this checkout's dicom-node, since /opt/dicom-node is not installed here."""
    program = Path(sys.executable).with_name("dicom-node")
    text = unit.read_text(encoding="utf-8")
    assert "ExecStart=/opt/dicom-node/venv/bin/dicom-node " in text and program.exists()
    copy = tmp_path / unit.name
    copy.write_text(text.replace("/opt/dicom-node/venv/bin/dicom-node", str(program)), encoding="utf-8")
    result = run([tool("systemd-analyze"), "verify", copy])
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
