"""A PACS (real Orthanc) that auto-routes every stable study to a node, as the end-to-end tests set it up.

Orthanc forwards each stable study with a Lua ``OnStableStudy`` (``StableAge`` 2 s), and the node
sends its results back to Orthanc over C-STORE (destination ``pacs``, default). Orthanc also
forwards those results back to the node, which must keep them and never run a job for them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from peers import NodeProcess, Orthanc

__all__ = ["FORWARD_STABLE_STUDIES", "pacs_routing_to_node"]

FORWARD_STABLE_STUDIES = """
function OnStableStudy(studyId, tags, metadata)
  RestApiPost('/modalities/node/store', '{"Resources": ["' .. studyId .. '"], "Synchronous": false}')
end
"""


@contextmanager
def pacs_routing_to_node(work: Path, label: str, *, destination: Mapping[str, Any] | None = None,
                         overrides: Mapping[str, Any] | None = None,
                         plugins: Iterable[str] = (),
                         more_destinations: Iterable[Mapping[str, Any]] = ()) -> Iterator[tuple[Orthanc, NodeProcess]]:
    """Orthanc auto-routing to a node (embedded worker) whose default destination is that Orthanc.

    ``destination``: extra fields of the ``pacs`` destination (e.g. ``not_performed``);
    ``more_destinations``: other destinations of the node (e.g. an HL7 listener);
    ``overrides``: more node settings (dotted keys, as :class:`peers.NodeProcess` takes them);
    ``plugins``: Orthanc plugins to load (e.g. ``libOrthancDicomWeb.so``, for a viewer).
    """
    orthanc = Orthanc(work / "orthanc", aet="PACS", lua_scripts={"forward.lua": FORWARD_STABLE_STUDIES},
                      plugins=plugins, extra_config={"StableAge": 2}, label=f"orthanc-{label}")
    orthanc.start()
    node: NodeProcess | None = None
    try:
        destinations = work / "destinations.yaml"
        destinations.write_text(yaml.safe_dump({"destinations": [{
            "type": "dicom", "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": orthanc.dicom_port,
            "default": True, **(destination or {})}, *map(dict, more_destinations)]}))
        node = NodeProcess(work / "node", overrides={
            "queue": {"broker_url": "memory://", "embedded_worker_queues": ["gpu", "io"],
                      "sweep_interval_seconds": 0.2},
            "routing.destinations_file": str(destinations), "dicom.allowed_callers": [{"ae_title": "PACS"}],
            **(overrides or {}),
        }, label=f"node-{label}").start()
        orthanc.set_modality("node", node.ae_title, node.port)
        yield orthanc, node
    finally:
        if node is not None:
            node.close()
        orthanc.stop()
