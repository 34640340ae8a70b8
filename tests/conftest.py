"""Shared fixtures. Each fixture family lives in its own module, registered here."""

pytest_plugins = ["tests.fixtures_model", "tests.fixtures_broker"]
