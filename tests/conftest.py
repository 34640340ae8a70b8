"""Shared fixtures. Each fixture family lives in its own module, registered here."""

from collections.abc import Iterator

import pytest

from moderation_worker.settings import CONFIG_FILE_ENV

pytest_plugins = ["tests.fixtures_model", "tests.fixtures_broker"]


@pytest.fixture(autouse=True)
def _config_file_env_is_per_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`load_settings(path)` exports the config file's path (so a SIGHUP reload finds it);
    a CLI command run in-process with `--config` must not hand its file to later tests."""
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    yield
