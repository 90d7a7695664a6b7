"""Remote commands: operators run a command on a device over MQTT and poll for its result."""
