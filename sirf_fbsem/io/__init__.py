"""Readers and writers: Interfile, listmode, normalisation, NIfTI, DICOM."""
