"""The admin web application and REST API (``create_app`` in :mod:`dicom_node.web.app`)."""
