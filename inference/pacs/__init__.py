"""The PACS side: studies received by the DICOM node (spool, routing rules) and results sent back
(the outbox on disk, delivery by C-STORE or STOW-RS)."""
