"""Business logic of adjustable weight, for the topology benchmark.

``BENCH_LOGIC_MS`` milliseconds of pure-Python CPU work per request before the model
(holding the GIL, as tokenizing, templating, PII scrubbing, retrieval glue or policy checks
in Python do), and ``BENCH_POST_MS`` on each complete answer's text (moderation, audit,
parsing), streamed or not. The servers load them with ``LLM_STEP_MODULES=bench.steps`` and
name them in ``LLM_PRE_STEPS`` and ``LLM_ANSWER_STEPS``.
"""

from __future__ import annotations

import os
import time

from logic.pipeline import Conversation, register_answer_step, register_pre_step


def burn(seconds: float) -> int:
    """``seconds`` of this thread's own CPU time in Python (GIL held); returns the work done
    (so it is not skipped). Counted in CPU time, not wall time: a thread that waits for the
    GIL or a core does the same work later, as real business logic would."""
    end = time.thread_time() + seconds
    total = 0
    while time.thread_time() < end:
        total += sum(range(200))
    return total


@register_pre_step("simulated_work", replace=True)
def simulated_work(settings) -> object:
    seconds = float(os.environ.get("BENCH_LOGIC_MS", "0")) / 1000

    def step(conversation: Conversation) -> Conversation:
        if seconds > 0:
            burn(seconds)
        return conversation

    return step


@register_answer_step("simulated_answer_work", replace=True)
def simulated_answer_work(settings) -> object:
    seconds = float(os.environ.get("BENCH_POST_MS", "0")) / 1000

    def step(text: str) -> None:
        if seconds > 0:
            burn(seconds)

    return step
