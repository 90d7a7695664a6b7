"""The logbook: device telemetry stored by the ingest worker and read back raw or aggregated."""
