"""Devices: the fleet's members, each known by id and by the unit_id it uses on the wire."""
