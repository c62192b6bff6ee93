"""One in-process app for every service test: BentoML registers its Prometheus metrics
globally, so a second ``ChatAPI.to_asgi()`` in one process fails. The monolith is served for
real in tests/e2e."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient


@pytest.fixture(scope="session")
def client(tiny_model_tag: str) -> Iterator[TestClient]:
    from service import ChatAPI

    with TestClient(ChatAPI.to_asgi(), raise_server_exceptions=False) as test_client:
        yield test_client
