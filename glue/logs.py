"""Structured logs: one JSON object per line, each line of a request carrying its id.

The request id is the client's ``X-Request-ID`` when it sent a sane one, else a new one. The
API sets it for the request's task (:data:`request_id`), sends it to the runner with the
generation, and echoes it in the response's ``X-Request-ID`` header, so one grep finds a
request's lines in the API's and the runner's logs.

Fields a log call adds with ``extra={"fields": {...}}`` become keys of the JSON object.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import re
import signal
import sys
import time
import uuid
from contextvars import ContextVar
from typing import Literal

request_id: ContextVar[str | None] = ContextVar("llm_request_id", default=None)

# Printable, header-safe and short: anything else from a client is replaced, not logged.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
# The loggers of this project: INFO and above are kept (BentoML's root keeps WARNING only).
PROJECT_LOGGERS = ("service", "logic", "runners", "api", "glue", "contract")
_BASE_KEYS = ("time", "level", "logger", "message", "service", "request_id")


def incoming_request_id(value: str | None) -> str:
    """The client's request id when it is a sane token, else a new random one."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


class JSONFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "service", "request_id", ...fields}``."""

    def __init__(self, service: str | None = None):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self.service:
            entry["service"] = self.service
        rid = request_id.get()
        if rid:
            entry["request_id"] = rid
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update({k: v for k, v in fields.items() if k not in _BASE_KEYS})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure_logging(
    fmt: Literal["json", "text"], level: str = "INFO", *, service: str | None = None
) -> None:
    """Format every handler BentoML set up (or a new stdout one) as ``fmt``, and keep this
    project's loggers at ``level``. Called in each worker once BentoML configured logging."""
    root = logging.getLogger()
    if not root.handlers:
        root.addHandler(logging.StreamHandler(sys.stdout))
    if fmt == "json":
        handlers = {*root.handlers, *logging.getLogger("bentoml").handlers}
        for handler in handlers:
            handler.setFormatter(JSONFormatter(service))
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(level.upper())


def configure_worker_logging(service_name: str, fmt: Literal["json", "text"], level: str) -> None:
    """JSON (or text) logs in a worker ``bentoml serve`` started, labelled ``name:worker``;
    a service built in a test's own process keeps pytest's logging."""
    import bentoml

    worker = bentoml.server_context.worker_index
    if worker is not None:
        configure_logging(fmt, level, service=f"{service_name}:{worker}")
        dump_stacks_on_signal()


# What makes a worker print every thread's stack: a stuck worker (a busy event loop, a lock)
# shows where it is without a debugger. BentoML's workers leave it unhandled (circus's
# supervisor, a process of its own, is the one that handles it).
STACKS_SIGNAL = signal.SIGUSR1


def dump_stacks_on_signal(file=None) -> None:
    """On ``STACKS_SIGNAL``, write every thread's Python stack to ``file`` (stderr, the log),
    and go on. Python's own faulthandler does it from C, so it answers even when the thread
    that holds the interpreter never lets go (a pure-Python handler would wait for it)."""
    faulthandler.register(STACKS_SIGNAL, file=file or sys.stderr, all_threads=True)
