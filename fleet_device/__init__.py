"""Fleet device agent: receives releases over MQTT and applies them to the local Docker engine."""

__version__ = "0.1.0"
