"""Shared fixtures: the real service on the tiny model, started through the operator's scripts."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service import ROOT, TINY_MODEL, Service, started


def pytest_configure(config: pytest.Config) -> None:
    if not (TINY_MODEL / "config.json").exists():
        # The model is a build product (make model-tiny); build it once rather than fail.
        subprocess.run([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "tools" / "make_tiny_model.py"),
                        str(TINY_MODEL)], check=True)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One real `vllm serve` for the whole run: tiny model, CPU, loopback, no API key."""
    yield from started(Service(tmp_path_factory.mktemp("server-logs")))


@pytest.fixture(scope="session")
def keyed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A second real server that requires an API key."""
    yield from started(Service(tmp_path_factory.mktemp("keyed-logs"), overrides={"API_KEY": "test-key-123"}))


@pytest.fixture
def fresh_service(tmp_path: Path) -> Iterator[Service]:
    """A service object of its own (not started) for lifecycle tests; cleaned up whatever happens."""
    svc = Service(tmp_path / "logs")
    try:
        yield svc
    finally:
        svc.stop()
        svc.force_cleanup()
