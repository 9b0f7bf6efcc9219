"""Where the ``dicom-node`` command finds its settings, the same way wherever it runs.

Why: an admin who runs ``dicom-node studies`` from another folder must see the node's
database, not a new empty one under the current folder. The order:

1. ``--config FILE`` on the command line;
2. the ``DICOM_NODE_CONFIG`` environment variable;
3. ``/etc/dicom-node/node.yaml`` (a packaged installation);
4. ``config/default.yaml`` of the checkout this code runs from (``make run``).

If none exists the built-in defaults apply. Relative paths (``data_dir``, the rules,
destinations and models files, TLS and key files) written in a file found by 3 or 4 are
taken relative to that installation - the folder of ``/etc/dicom-node/node.yaml``, the
checkout's root - not to the current folder; those of a file named by 1 or 2, like the
``--data-dir`` option, are relative to the current folder, as a shell user expects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dicom_node.settings import Settings

__all__ = ["CONFIG_ENV", "SYSTEM_CONFIG", "ConfigChoice", "anchor_relative_paths", "find_config"]

CONFIG_ENV = "DICOM_NODE_CONFIG"
SYSTEM_CONFIG = Path("/etc/dicom-node/node.yaml")
#: The checkout this module runs from: ``<checkout>/dicom_node/config_lookup.py``.
CHECKOUT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ConfigChoice:
    """The settings file chosen (``None``: built-in defaults), why, and what was looked at on the way."""

    path: Path | None
    source: str
    #: Folder that relative paths of the file are taken from; ``None``: the current folder.
    base_dir: Path | None
    looked_at: tuple[str, ...]

    def describe(self) -> str:
        """One line for messages: the file used (or built-in defaults) and every place looked at."""
        used = f"{self.path} ({self.source})" if self.path is not None else "built-in defaults"
        return f"settings: {used}; looked at: {'; '.join(self.looked_at)}"


def find_config(cli_path: Path | None, environ: Mapping[str, str], *, system_file: Path = SYSTEM_CONFIG,
                checkout: Path = CHECKOUT) -> ConfigChoice:
    """The settings file to use, in the order of this module's docstring.

    A file named by ``--config`` or ``DICOM_NODE_CONFIG`` must exist (``FileNotFoundError``
    naming it): a typo must not silently start a node on the defaults.
    """
    looked: list[str] = []
    if cli_path is not None:
        return ConfigChoice(_existing(cli_path, "--config"), "--config", None, (f"--config {cli_path}",))
    looked.append("--config (not given)")
    env_value = environ.get(CONFIG_ENV, "").strip()
    if env_value:
        path = Path(env_value)
        return ConfigChoice(_existing(path, f"${CONFIG_ENV}"), f"${CONFIG_ENV}", None,
                            (*looked, f"${CONFIG_ENV}={env_value}"))
    looked.append(f"${CONFIG_ENV} (not set)")
    if system_file.is_file():
        return ConfigChoice(system_file, "system", system_file.parent, (*looked, str(system_file)))
    looked.append(f"{system_file} (absent)")
    checkout_file = checkout / "config" / "default.yaml"
    if (checkout / "pyproject.toml").is_file() and checkout_file.is_file():
        return ConfigChoice(checkout_file, "checkout", checkout, (*looked, str(checkout_file)))
    looked.append(f"{checkout_file} (absent)")
    return ConfigChoice(None, "defaults", None, tuple(looked))


def _existing(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} (from {what}) does not exist")
    return path


def anchor_relative_paths(settings: Settings, base_dir: Path | None) -> Settings:
    """``settings`` with its relative file and folder paths taken from ``base_dir`` (unchanged when ``None``)."""
    if base_dir is None:
        return settings

    def anchored(path: Path | None) -> Path | None:
        return path if path is None or path.is_absolute() else base_dir / path

    routing = settings.routing.model_copy(update={
        name: anchored(getattr(settings.routing, name)) for name in ("rules_file", "destinations_file", "models_file")})
    tls = settings.dicom.tls.model_copy(update={
        name: anchored(getattr(settings.dicom.tls, name)) for name in ("certificate", "private_key", "ca_certificates")})
    dicom = settings.dicom.model_copy(update={"tls": tls})
    web = settings.web.model_copy(update={"secret_key_file": anchored(settings.web.secret_key_file)})
    return settings.model_copy(update={"data_dir": anchored(settings.data_dir), "routing": routing, "dicom": dicom,
                                       "web": web})
