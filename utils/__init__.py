"""Shared building blocks of the gateway: protocol rules, multipart I/O, DICOM helpers, config."""
