"""Dead letters: device reports the ingest worker acknowledged without storing them, kept for admins to read."""
