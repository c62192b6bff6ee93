"""A real `bentoml serve` of the split topology with the tiny model: fast enough to push
hundreds of concurrent streams and thousands of requests through on a laptop."""

from __future__ import annotations

import os
from collections.abc import Iterator

import psutil
import pytest

from tests.served import BENTOML, ServedProcess, free_port


@pytest.fixture(scope="module")
def tiny_server(tiny_model_tag: str) -> Iterator[ServedProcess]:
    """ChatAPI (2 workers) and LLMRunner serving the tiny model from the tests' model store,
    with the default limits: 16 batch slots, 32 requests in flight at the runner."""
    env = {**os.environ, "LLM_MODEL": tiny_model_tag, "LLM_API_WORKERS": "2"}
    # As `make serve` serves: its keep-alive outlasts the clients' (at uvicorn's 5 s, the
    # clients that wait out a Retry-After sometimes sent on a connection it was closing).
    command = [BENTOML, "serve", "service:ChatAPI", "--timeout-keep-alive", "75"]
    with ServedProcess(command, port=free_port(), env=env) as s:
        yield s


def service_processes(root: psutil.Process) -> dict[str, psutil.Process]:
    """The server's workers by role: ``ChatAPI:1``, ``ChatAPI:2``, ``LLMRunner:1``."""
    found: dict[str, psutil.Process] = {}
    for process in root.children(recursive=True):
        args = process.cmdline()
        if "--service-name" in args:
            name = args[args.index("--service-name") + 1]
            index = args[args.index("--worker-id") + 1] if "--worker-id" in args else "?"
            found[f"{name}:{index}"] = process
    return found
