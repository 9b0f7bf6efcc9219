"""Read the CT volume of an InVesalius project (``.inv3``), e.g. the real head CT Debian ships.

Why: a real CT available offline (package ``invesalius-examples``:
``/usr/share/doc/invesalius-examples/examples/Cranium.inv3``) lets us check what the
phantom-trained models do on real anatomy. An ``.inv3`` file is a gzipped tar with a
``main.plist`` (shape, dtype, spacing) and the voxels as a raw array (``matrix.dat``).
"""

from __future__ import annotations

import plistlib
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = ["INVESALIUS_EXAMPLE", "InVesaliusVolume", "read_invesalius_project"]

#: The real head CT of Debian's ``invesalius-examples`` package.
INVESALIUS_EXAMPLE = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")


@dataclass(frozen=True)
class InVesaliusVolume:
    """Voxels (z, y, x) in HU and their spacing (z, y, x) in mm, with the project's name and modality."""

    volume: npt.NDArray[np.int16]
    spacing_zyx_mm: tuple[float, float, float]
    name: str
    modality: str


def read_invesalius_project(path: str | Path) -> InVesaliusVolume:
    """The CT volume of an ``.inv3`` project; ValueError naming the file when it is not one."""
    path = Path(path)
    try:
        with tarfile.open(path, "r:*") as archive:
            members = {Path(m.name).name: m for m in archive.getmembers() if m.isfile()}
            if "main.plist" not in members:
                raise ValueError(f"{path}: no main.plist inside; not an InVesalius project")
            main = plistlib.loads(archive.extractfile(members["main.plist"]).read())  # type: ignore[union-attr]
            matrix = main["matrix"]
            data_name = Path(matrix["filename"]).name
            if data_name not in members:
                raise ValueError(f"{path}: {data_name} named by main.plist is missing")
            raw = archive.extractfile(members[data_name]).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError, KeyError, plistlib.InvalidFileException) as exc:
        raise ValueError(f"{path}: cannot read it as an InVesalius project ({exc})") from exc
    shape = tuple(int(n) for n in matrix["shape"])
    dtype = np.dtype(matrix["dtype"])
    if len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{path}: {data_name} holds {len(raw)} bytes, shape {shape} of {dtype} needs "
                         f"{int(np.prod(shape)) * dtype.itemsize}")
    sx, sy, sz = (float(v) for v in main["spacing"])  # InVesalius stores (x, y, z)
    volume = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(np.int16)
    return InVesaliusVolume(volume, (sz, sy, sx), str(main.get("name", path.stem)), str(main.get("modality", "CT")))
