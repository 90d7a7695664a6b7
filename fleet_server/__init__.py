"""Fleet server: the REST API, the MQTT bridge and the report ingest worker."""

__version__ = "0.1.0"
