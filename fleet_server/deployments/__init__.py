"""Deployments: how far each release got on each device, as the devices report it."""
