"""The wiring layer: the only code that builds the node's processes from settings.

Why a layer of its own (DESIGN.md, "Layers"): the node's receive, routing, delivery
and web code never import :mod:`workers`, and the workers never import the node's
receive, routing or web code; both sides share only the lower layer (contracts,
settings, the database and its repositories, the model catalog). Something must still
put a listener, a router, a dispatcher and a worker into one process (``serve``) or a
worker alone into another (``dicom-node worker``): that is this package, and only it
may import both sides. ``tests/unit/test_import_layers.py`` keeps it so.

* :mod:`dicom_node.app.cli` - the ``dicom-node`` command line (finds the settings,
  runs a command);
* :mod:`dicom_node.app.node` - the ``serve`` process and the worker of either process;
* :mod:`dicom_node.app.tasks` - the Celery tasks, which call the worker pipeline and the dispatcher.
"""
