"""Shared pytest configuration: loads the fixture plugins used across the test suite."""

pytest_plugins = ["tests.support.infra", "tests.support.databases", "tests.support.stack", "tests.support.secure_broker"]
