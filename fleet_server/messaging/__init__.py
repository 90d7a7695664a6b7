"""The server's messaging floor: the MQTT client, the outbox of retained releases, the ingest dispatcher and its workers."""
