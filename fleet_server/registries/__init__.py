"""Registries: private Docker registries and the credentials devices log in with."""
