"""A BentoML server in a subprocess (its own process group), for end-to-end tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).with_name("bentoml"))
# What a Bento container's entrypoint runs for `start-http-server`: one service of a Bento,
# with `--service-name`, or the entry service pointed at remote dependencies with `--depends`.
START_HTTP_SERVER = [sys.executable, "-m", "bentoml_cli._internal.start", "start-http-server"]


def own_home(store_home: str, root: Path) -> str:
    """A BENTOML_HOME of its own for one server of several on this host, sharing the model
    store of ``store_home``. BentoML keeps its metrics files in ``$BENTOML_HOME/
    prometheus_multiproc_dir`` and every server start wipes that folder: servers that share
    a home lose each other's series and report each other's load."""
    home = Path(tempfile.mkdtemp(prefix="bentoml-home-", dir=root))
    (home / "models").symlink_to(Path(store_home) / "models")
    return str(home)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServedProcess:
    """``command`` listening on ``port``; ``start`` waits for its ``/readyz``."""

    def __init__(
        self,
        command: list[str],
        *,
        port: int,
        env: dict[str, str],
        cwd: Path = ROOT,
        start_timeout: float = 180,
        host: str = "127.0.0.1",
    ):
        self.command = [*command, "--host", host, "--port", str(port)]
        self.start_timeout = start_timeout
        self.url = f"http://{host}:{port}"
        self.env, self.cwd = env, cwd
        self.proc: subprocess.Popen | None = None
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 -- read back on failure, closed in stop

    @property
    def process(self) -> psutil.Process:
        assert self.proc is not None
        return psutil.Process(self.proc.pid)

    def log(self, limit: int | None = 4000) -> str:
        """What the server printed: its last ``limit`` characters, or all of it."""
        self._log.seek(0)
        text = self._log.read().decode(errors="replace")
        return text if limit is None else text[-limit:]

    def launch(self) -> None:
        self.proc = subprocess.Popen(
            self.command,
            cwd=self.cwd,
            # Each line in the log as it is written, so a failure's log ends where it failed.
            env={**self.env, "PYTHONUNBUFFERED": "1"},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float | None = None) -> None:
        timeout = timeout or self.start_timeout
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.command} exited during start-up:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.url} was not ready in {timeout} s:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)

    def start(self, timeout: float | None = None) -> ServedProcess:
        self.launch()
        self.wait_ready(timeout or self.start_timeout)
        return self

    def dump_stacks(self) -> None:
        """Every BentoML worker prints its threads' stacks to the log (glue/logs.py), for a
        test that found the server stuck to show where."""
        from glue.logs import STACKS_SIGNAL

        for process in self.process.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                command = process.cmdline()
                if "_bentoml_impl.worker" in " ".join(command):
                    self._log.seek(0, os.SEEK_END)  # the file the server writes: a heading
                    self._log.write(f"--- stacks of pid {process.pid}, "
                                    f"{' '.join(command[3:8])}:\n".encode())  # fmt: skip
                    self._log.flush()
                    process.send_signal(STACKS_SIGNAL)
                    time.sleep(0.5)  # one at a time: they share the log

    def stop(self) -> None:
        """SIGTERM to the whole process group, SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        workers = self.process.children(recursive=True)
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        _, left = psutil.wait_procs(workers, timeout=10)
        for worker in left:  # in a session of its own, it outlived the group's signal
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()

    def kill(self) -> None:
        """SIGKILL to the server and every process under it, at once, as a crashed machine
        would (its workers run in sessions of their own: a process-group kill misses them)."""
        tree = [*self.process.children(recursive=True), self.process]
        for process in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        psutil.wait_procs(tree, timeout=10)

    def close(self) -> None:
        self.stop()
        self._log.close()

    def __enter__(self) -> ServedProcess:
        """Started and ready; closed on leaving, whatever happened in between."""
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type, *exc_info: object) -> None:
        if exc_type is not None:  # a failed test shows what the server said (captured stderr)
            sys.stderr.write(f"--- {' '.join(self.command)} printed:\n{self.log(12000)}\n")
        self.close()


def scrape(url: str, headers: dict[str, str] | None = None) -> dict[tuple, float]:
    """``url``'s ``/metrics`` as ``{(sample name, sorted label pairs): value}``."""
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    response.raise_for_status()
    return samples(response.text)


def samples(text: str) -> dict[tuple, float]:
    """Prometheus text as ``{(sample name, sorted label pairs): value}``."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
