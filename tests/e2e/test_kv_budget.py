"""The KV memory budget on the real model through `bentoml serve`: a flood of long prompts and
long answers on a budget that holds about two of them is answered or refused with 429,
never failed, and the runner's KV stays the budget it was given."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from contract.settings import DEFAULT_MODEL
from tests.conftest import USER_BENTOML_HOME
from tests.e2e.test_serve import default_model_in_store
from tests.served import BENTOML, ServedProcess, free_port, scrape

BUDGET_GIB = 0.04  # SmolLM2-135M: 45 KiB per token, so about 930 positions (58 blocks)
TOPICS = ["lighthouses", "bread", "chess", "rivers", "trains", "gardens", "bridges", "music"]


def test_a_flood_on_a_small_kv_budget_is_answered_or_refused_never_failed():
    if not default_model_in_store():
        pytest.skip(f"{DEFAULT_MODEL} is not in {USER_BENTOML_HOME}: run `make model`")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(
        BENTOML_HOME=USER_BENTOML_HOME, BENTOML_DO_NOT_TRACK="true",
        LLM_KV_CACHE_GIB=str(BUDGET_GIB), LLM_RUNNER_MAX_IN_FLIGHT="6",
        # Requests queue for the budget here, and the idle timeout counts that wait: on a
        # loaded machine the last of six waited past its default 60 s (a 504). This test is
        # about admission, not timeouts (tests/unit/test_deadlines.py has those).
        LLM_STREAM_IDLE_TIMEOUT="600",
    )  # fmt: skip
    with ServedProcess([BENTOML, "serve", "service:ChatAPI"], port=free_port(), env=env) as served:

        def ask(i: int) -> httpx.Response:
            topic = TOPICS[i % len(TOPICS)]
            text = f"Request {i}. Write a long essay about {topic}. " + f"Mention {topic}. " * 40
            body = {"messages": [{"role": "user", "content": text}], "max_tokens": 120,
                    "temperature": 0}  # fmt: skip
            return httpx.post(f"{served.url}/v1/chat/completions", json=body, timeout=300)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(ask, range(12)))
        statuses = sorted(r.status_code for r in answers)
        assert set(statuses) <= {200, 429}, [r.text[:200] for r in answers]
        assert statuses.count(200) >= 6, statuses
        for response in answers:
            if response.status_code == 200:
                usage = response.json()["usage"]
                assert usage["prompt_tokens"] > 150 and usage["completion_tokens"] > 0
            else:
                assert response.json()["error"]["code"] == "model_at_capacity"
        metrics = scrape(served.url)
        blocks = metrics[("llm_runner_kv_cache_blocks", ())]
        per_block = metrics[("llm_runner_kv_cache_block_tokens", ())]
        assert blocks * per_block <= BUDGET_GIB * 2**30 / (45 * 1024)  # the pool is the budget
        assert blocks * per_block > 2 * 300  # which holds about two of these requests at once
        assert metrics[("llm_runner_kv_cache_usage_ratio", ())] == 0  # all given back
        assert metrics[("llm_runner_requests_running", ())] == 0
