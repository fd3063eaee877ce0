"""DICOM in and out: the fast header reader, the checks every instance passes before a handler
reads it, series and volumes for handlers, and the result objects written back (SC, SR, SEG)."""
