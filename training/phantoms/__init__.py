"""Synthetic imaging phantoms.

Deterministic, dependency-light generators of realistic DICOM data, used by the
receiver's tests and benchmarks and as a source of synthetic training data,
so no patient data is needed to exercise the node end to end.
"""
