"""Releases: what a project's devices must run, version by version."""
