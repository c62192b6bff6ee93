"""Structured logs: sane request ids kept, anything else replaced; one JSON object a line."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap

import pytest

from glue.logs import JSONFormatter, configure_logging, incoming_request_id, request_id
from tests.served import ROOT


@pytest.mark.parametrize("value", ["abc-123", "0f8e4c1a2b3d", "trace:span/7", "a" * 128])
def test_a_sane_client_request_id_is_kept(value):
    assert incoming_request_id(value) == value


@pytest.mark.parametrize("value", [None, "", "a" * 129, "two words", "x\nforged: line", "é"])
def test_anything_else_gets_a_new_id(value):
    new = incoming_request_id(value)
    assert new != value and len(new) == 32 and new.isalnum()
    assert incoming_request_id(value) != new  # fresh every time


def _emit(logger: logging.Logger, formatter: logging.Formatter, *args, **kwargs) -> dict:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    try:
        logger.warning(*args, **kwargs)
    finally:
        logger.removeHandler(handler)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1  # one record, one line, whatever the message holds
    return json.loads(lines[0])


def test_a_record_is_one_json_line_with_the_request_id_and_fields():
    token = request_id.set("req-42")
    try:
        entry = _emit(
            logging.getLogger("logic.test"),
            JSONFormatter("ChatAPI:1"),
            "done %s\nsecond line",
            "now",
            extra={"fields": {"completion_tokens": 7, "level": "forged"}},
        )
    finally:
        request_id.reset(token)
    assert entry["message"] == "done now\nsecond line"
    assert entry["request_id"] == "req-42" and entry["service"] == "ChatAPI:1"
    assert entry["logger"] == "logic.test" and entry["completion_tokens"] == 7
    assert entry["level"] == "WARNING"  # fields never overwrite the base keys
    assert entry["time"].endswith("Z")


def test_exceptions_are_kept_inside_the_line():
    try:
        raise ValueError("boom")
    except ValueError:
        entry = _emit(logging.getLogger("logic.test"), JSONFormatter(), "failed", exc_info=True)
    assert "request_id" not in entry
    assert "ValueError: boom" in entry["exception"]


def test_configure_formats_existing_handlers_and_opens_project_loggers():
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    root.addHandler(handler)
    levels = {name: logging.getLogger(name).level for name in ("service", "logic", "runners")}
    try:
        configure_logging("json", "INFO", service="LLMRunner")
        assert isinstance(handler.formatter, JSONFormatter)
        assert handler.formatter.service == "LLMRunner"
        assert logging.getLogger("runners.llm").getEffectiveLevel() == logging.INFO
    finally:
        root.removeHandler(handler)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def test_a_worker_prints_every_threads_stack_on_its_signal_and_goes_on():
    """``kill -USR1`` on a stuck worker shows where each of its threads is (docs/operations.md)."""
    script = textwrap.dedent(
        """
        import os, threading, time
        from glue.logs import STACKS_SIGNAL, dump_stacks_on_signal

        def waiting_in_a_helper_thread():
            time.sleep(30)

        dump_stacks_on_signal()
        threading.Thread(target=waiting_in_a_helper_thread, daemon=True).start()
        time.sleep(0.2)
        os.kill(os.getpid(), STACKS_SIGNAL)
        time.sleep(0.2)
        print("still here")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and done.stdout.strip() == "still here", done.stderr
    assert "waiting_in_a_helper_thread" in done.stderr  # the other thread's stack too
    assert "Current thread" in done.stderr
