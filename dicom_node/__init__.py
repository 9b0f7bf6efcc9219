"""The DICOM AI node: receiving, indexing and routing studies, and serving the admin UI."""
