"""The package as the images install it: a wheel built from what ``.dockerignore`` lets into the build
context, run from its installed layout (not from the checkout) the way ``node.Dockerfile`` runs it.

Why: the images (deploy/*.Dockerfile) and a ``pip install .`` get only what the wheel
holds. A file the code reads at run time but the wheel leaves out (the web app's
templates were one) works in every test on the checkout and fails in production.
Base images cannot be pulled on these machines, so this is the nearest check of
the node image: its files, its settings from environment variables, its health check.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

from peers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def build_context(target: Path) -> Path:
    """A copy of the files ``.dockerignore`` lets in (its ``!name`` lines below the ``**`` that excludes all)."""
    target.mkdir(parents=True)
    lines = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    allowed = [line[1:].rstrip("/") for line in lines if line.startswith("!")]
    assert {"pyproject.toml", "dicom_node", "workers"} <= set(allowed), allowed
    for name in allowed:
        source = REPO_ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, target / name)
    return target


def test_the_wheel_of_the_image_context_holds_every_file_and_serves(tmp_path: Path) -> None:
    context = build_context(tmp_path / "context")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                    "--wheel-dir", str(tmp_path / "wheel"), str(context)], check=True, timeout=300)
    wheel = zipfile.ZipFile(next((tmp_path / "wheel").glob("dicom_node-*.whl")))
    packaged = set(wheel.namelist())
    shipped = [path.relative_to(context).as_posix() for package in ("dicom_node", "workers")
               for path in sorted((context / package).rglob("*")) if path.is_file()]
    missing = [name for name in shipped if name not in packaged]
    assert not missing, f"files the wheel (and so every image) leaves out: {missing}"
    installed = tmp_path / "site"
    wheel.extractall(installed)

    ports = {"web": free_port(), "dicom": free_port()}
    environment = {  # as node.Dockerfile and compose.yaml set them, with free ports and no models to load
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONPATH": str(installed),
        "PYTHONUNBUFFERED": "1", "DICOM_NODE_DATA_DIR": str(tmp_path / "data"),
        "DICOM_NODE_DICOM__BIND_ADDRESS": "127.0.0.1", "DICOM_NODE_WEB__HOST": "0.0.0.0",
        "DICOM_NODE_WEB__PORT": str(ports["web"]), "DICOM_NODE_DICOM__PORT": str(ports["dicom"]),
        "DICOM_NODE_QUEUE__EMBEDDED_WORKER_QUEUES": '["io"]', "DICOM_NODE_STORAGE__MIN_FREE_MB": "0",
    }
    check = [sys.executable, "-m", "dicom_node", "serve", "--check"]
    log = (tmp_path / "node.log").open("wb")
    node = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve"], env=environment, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while True:
            result = subprocess.run(check, env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=60)
            if result.returncode == 0 or time.monotonic() > deadline or node.poll() is not None:
                break
            time.sleep(1)
        assert result.returncode == 0, result.stderr + (tmp_path / "node.log").read_text(errors="replace")[-3000:]
        assert "200 ready" in result.stdout
        base = f"http://127.0.0.1:{ports['web']}"
        with urllib.request.urlopen(f"{base}/login", timeout=10) as page:
            assert page.status == 200 and b"<form" in page.read()
        with urllib.request.urlopen(f"{base}/static/app.css", timeout=10) as css:
            assert css.status == 200 and css.read()
        running = subprocess.run([sys.executable, "-c", "import dicom_node; print(dicom_node.__file__)"],
                                 env=environment, cwd=tmp_path, capture_output=True, text=True, timeout=60).stdout
        assert running.startswith(str(installed)), running  # the installed copy ran, not the checkout
    finally:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=45)  # the images' stop grace period
        except subprocess.TimeoutExpired:
            node.kill()
        log.close()
    assert node.returncode == 0, (tmp_path / "node.log").read_text(errors="replace")[-3000:]
