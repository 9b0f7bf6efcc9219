"""DICOM result objects (SEG, TID 1500 SR, GSPS): the only highdicom code, pure functions."""
