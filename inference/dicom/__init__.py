"""DICOM in and out: the fast header reader, the checks every instance passes before a handler
reads it, the DICOM files of a folder, series and volumes for handlers, and the result objects
written back (SC, SR, SEG)."""
