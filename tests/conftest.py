"""Shared fixtures: a real Eclipse Mosquitto broker on a free loopback port.

The MQTT tests run against the broker deployments use, not a mock. Mosquitto is a test
requirement (`.ci/run` installs it with apt); when it is missing the fixture fails with a clear
message instead of skipping, so a green run always means the MQTT paths were exercised.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from edge import mosquitto as broker


@contextmanager
def run_mosquitto(workdir: Path, extra_conf: str = "", listener_opts: str = "") -> Iterator[tuple[str, int]]:
    """``edge.mosquitto.run_mosquitto`` for tests: a broker that cannot start fails the test."""
    try:
        with broker.run_mosquitto(workdir, extra_conf, listener_opts) as address:
            yield address
    except broker.MosquittoError as exc:
        pytest.fail(f"the MQTT tests need a real broker: {exc}; .ci/run installs it in CI")


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """A plain mosquitto (anonymous, loopback, no persistence) shared by the test session."""
    with run_mosquitto(tmp_path_factory.mktemp("mosquitto")) as address:
        yield address
