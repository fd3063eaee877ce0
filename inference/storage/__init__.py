"""The storage layer every store stands on: the backend chosen once from the settings (``backend``), one
connection and error policy per kind (``sqlite``, ``redis``), and versioned schemas with their
migrations (``migrations``; ``inference-migrate`` runs them).

The stores themselves (jobs, reviews, users, Radiomics records, the result history) live beside the code
that uses them and are built on this: each has one interface, an SQLite and a Redis implementation, and
explicit ``to_row``/``from_row`` codecs (``rows``), so a field added, renamed or removed later is a
migration, never a record that no longer loads.
"""
