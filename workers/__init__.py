"""Celery workers: series to volume, model inference, DICOM SEG/SR encoding and delivery."""
