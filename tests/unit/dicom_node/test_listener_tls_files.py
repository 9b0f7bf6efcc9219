"""The listener's own TLS files are checked before use: a wrong file is named, an encrypted key never prompts."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dicom_node.scp import build_ssl_context
from dicom_node.settings import DicomSettings


def openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("listener-tls")
    openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "plain.key", "-out", "cert.pem",
            "-days", "2", "-subj", "/CN=node")
    openssl(folder, "pkey", "-in", "plain.key", "-aes256", "-passout", "pass:secret", "-out", "encrypted.key")
    (folder / "notes.txt").write_text("not a certificate\n")
    return folder


def tls(pem: Path, **files: str) -> DicomSettings:
    values = {"certificate": pem / "cert.pem", "private_key": pem / "plain.key"}
    values.update({name: pem / file for name, file in files.items()})
    return DicomSettings(tls={"enabled": True, **values})


def test_usable_files_make_a_context(pem: Path) -> None:
    assert build_ssl_context(tls(pem)) is not None


@pytest.mark.parametrize("files, field", [
    ({"private_key": "encrypted.key"}, "dicom.tls.private_key"),
    ({"certificate": "notes.txt"}, "dicom.tls.certificate"),
    ({"ca_certificates": "notes.txt"}, "dicom.tls.ca_certificates"),
    ({"ca_certificates": "missing.pem"}, "dicom.tls.ca_certificates"),
])
def test_each_unusable_file_is_named_with_what_is_wrong(pem: Path, files: dict[str, str], field: str) -> None:
    with pytest.raises(RuntimeError) as raised:
        build_ssl_context(tls(pem, **files))
    assert field in str(raised.value) and str(pem / next(iter(files.values()))) in str(raised.value)
