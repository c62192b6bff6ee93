"""The API's router over runner replicas (api/router.py), with stand-in runner clients: the
routing rule, failover before the first token, health, DNS. The same paths through real
`bentoml serve` runners are in tests/e2e/test_replicas.py."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from api.router import PrefixIndex, RouterSettings, RunnerPool, parse_runner_urls, parse_series
from contract.errors import EngineBusyError, EngineClosedError, EngineRequestError
from contract.prefix import chain_hashes
from contract.tokens import GenerationChunk, SamplingParams
from logic.settings import APISettings

PARAMS = SamplingParams(max_new_tokens=4)
A, B, C = "http://10.0.1.1:1", "http://10.0.1.2:2", "http://10.0.1.3:3"
BS = 16


class FakeRunner:
    """A runner client: answers ``tokens`` then stops, or fails as told."""

    def __init__(self, url: str):
        self.url = url
        self.is_local = False
        self.prompts: list[list[int]] = []
        self.fail_before: BaseException | None = None  # raised before any token
        self.fail_after: BaseException | None = None  # raised after the first token
        self.healthy = True
        self.in_flight_reported = 0
        self.closed = False

    async def generate(self, prompt_ids, params, *, request_id=None):
        self.prompts.append(list(prompt_ids))
        await asyncio.sleep(0)
        if self.fail_before is not None:
            raise self.fail_before
        yield GenerationChunk(token_ids=[1, 2], cached_tokens=0)
        if self.fail_after is not None:
            raise self.fail_after
        yield GenerationChunk(token_ids=[3], finish_reason="stop")

    async def ready(self, timeout: float = 2.0) -> bool:
        return self.healthy

    async def metrics(self, key=None, timeout: float = 2.0) -> str:
        if not self.healthy:
            return ""
        return (
            "# HELP llm_runner_requests_in_flight x\n"
            f"llm_runner_requests_in_flight {self.in_flight_reported}.0\n"
            f"llm_runner_kv_cache_block_tokens {BS}.0\n"
        )

    async def close(self) -> None:
        self.closed = True


DEFAULTS = APISettings.model_construct().router_options()  # the defaults, without the env


def pool_of(urls, policy="prefix", slack=4, resolver=None, **extra) -> RunnerPool:
    runners: dict[str, FakeRunner] = {}

    def make(url: str) -> FakeRunner:
        runners[url] = FakeRunner(url)
        return runners[url]

    options = {"resolver": resolver} if resolver else {}
    pool = RunnerPool(
        urls, RouterSettings(**{**DEFAULTS, "policy": policy, "balance_slack": slack, **extra}),
        make, **options,
    )  # fmt: skip
    pool.fakes = runners  # type: ignore[attr-defined]
    return pool


async def answer(pool: RunnerPool, prompt: list[int], request_id: str | None = None) -> list[int]:
    ids = []
    async for chunk in pool.generate(prompt, PARAMS, request_id=request_id):
        ids += chunk.token_ids
    return ids


def served_by(pool: RunnerPool, prompt: list[int]) -> list[str]:
    return [url for url, fake in pool.fakes.items() if prompt in fake.prompts]


def run(coro):
    return asyncio.run(coro)


def test_the_url_list_is_split_trimmed_and_deduplicated():
    assert parse_runner_urls(" http://a:1/, http://b:2,,http://a:1") == ["http://a:1", "http://b:2"]


def test_one_runner_url_is_todays_path_no_probing_no_routing():
    pool = pool_of([A])
    assert pool.single is not None and not pool.dynamic
    assert run(answer(pool, list(range(40)))) == [1, 2, 3]
    pool.fakes[A].fail_before = aiohttp.ClientConnectionError("refused")
    with pytest.raises(aiohttp.ClientConnectionError):  # no other replica, no retry
        run(answer(pool, list(range(40))))
    assert pool._task is None


def test_a_conversation_follows_the_replica_that_holds_its_earlier_turns():
    async def go():
        pool = pool_of([A, B])
        users = [[1000 * u + i for i in range(3 * BS)] for u in range(6)]
        first = [served_by(pool, u) for u in users if await answer(pool, u)]
        assert {tuple(f) for f in first} == {
            (A,),
            (B,),
        }  # spread
        for user in users:  # the next turn: the whole first turn, the answer, more
            turn = user + [1, 2, 3] + [7] * (2 * BS)
            await answer(pool, turn)
            assert served_by(pool, turn) == served_by(pool, user)
        await pool.close()

    run(go())


def test_api_workers_that_share_no_state_place_a_new_conversation_alike():
    """Each API worker has an index of its own: a conversation's turns that reach different
    workers still meet on one replica (rendezvous hash on the first block nobody holds)."""
    workers = [pool_of([A, B, C]) for _ in range(2)]
    for u in range(12):
        prompt = [5000 * u + i for i in range(2 * BS)]
        hashes = chain_hashes(prompt, BS)
        (first, reason, _), (second, _, _) = (w.pick(hashes) for w in workers)
        assert first.url == second.url and reason == "hash"
    one = workers[0]
    spread = {one.pick(chain_hashes([9000 * u] * (2 * BS), BS))[0].url for u in range(12)}
    assert spread == {A, B, C}  # new conversations spread over the replicas


def test_a_shared_system_prompt_held_by_one_replica_does_not_pull_every_new_conversation():
    """New conversations share the tenant's prompt (a quarter of each): the replica that
    first cached it must not get them all, or the others idle while it queues."""
    pool = pool_of([A, B, C])
    tenant = list(range(2 * BS))
    a = pool.replicas[A]
    a.index.add(chain_hashes(tenant, BS), 0.0)
    a.index.ttl = float("inf")
    picks = {}
    for u in range(30):
        prompt = tenant + [7000 * u + i for i in range(6 * BS)]
        replica, reason, _ = pool.pick(chain_hashes(prompt, BS))
        picks[replica.url] = picks.get(replica.url, 0) + 1
        assert reason == "hash"
    assert set(picks) == {A, B, C} and max(picks.values()) < 20, picks
    # A later turn, most of it held by one replica, goes there.
    turn = tenant + [1] * (6 * BS)
    b = pool.replicas[B]
    b.index.add(chain_hashes(turn, BS), 0.0)
    b.index.ttl = float("inf")
    assert pool.pick(chain_hashes(turn + [2] * BS, BS))[:2] == (b, "prefix")


def test_a_shared_prefix_goes_where_it_is_cached_until_loads_differ_by_the_slack():
    pool = pool_of([A, B], slack=2)
    shared = list(range(4 * BS))
    hashes = chain_hashes(shared + [1], BS)
    a, b = pool.replicas.values()
    a.index.add(hashes, 0.0)
    a.index.ttl = float("inf")
    assert pool.pick(hashes)[:2] == (a, "prefix")
    a.in_flight = 2  # within the slack of b's 0
    assert pool.pick(hashes)[0] is a
    a.in_flight = 3  # past it: the least loaded, whatever it holds
    assert pool.pick(hashes)[:2] == (b, "balance")
    a.in_flight, a.reported = 0, 5  # what the runner reports counts too (other API workers)
    assert pool.pick(hashes)[0] is b


def test_round_robin_and_least_loaded_ignore_the_cache():
    pool = pool_of([A, B, C], policy="round_robin")
    picks = [pool.pick([])[0].url for _ in range(6)]
    assert sorted(picks) == sorted([A, B, C] * 2)
    pool = pool_of([A, B], policy="least_loaded")
    a, b = pool.replicas.values()
    a.in_flight = 1
    assert all(pool.pick([])[0] is b for _ in range(3))


def test_the_choices_of_one_request_go_to_one_replica():
    async def go():
        pool = pool_of([A, B], policy="round_robin")
        prompt = list(range(2 * BS))
        await asyncio.gather(*(answer(pool, prompt, request_id="req-1") for _ in range(4)))
        counts = {url: len(f.prompts) for url, f in pool.fakes.items()}
        assert sorted(counts.values()) == [0, 4]

    run(go())


def test_a_replica_that_fails_before_any_token_is_left_and_the_request_retried_elsewhere():
    async def go():
        pool = pool_of([A, B], policy="round_robin")
        a = pool.fakes[A]
        a.fail_before, a.healthy = aiohttp.ServerDisconnectedError(), False  # it died
        results = [await answer(pool, [5] * 20) for _ in range(4)]
        assert results == [[1, 2, 3]] * 4  # nothing lost
        assert not pool.replicas[A].up and len(a.prompts) == 1  # then left out
        # It answers again: the next probe puts it back, and it is used again.
        a.fail_before, a.healthy = None, True
        await pool.refresh()
        assert pool.replicas[A].up
        await answer(pool, [6] * 20)
        await answer(pool, [6] * 20)
        assert len(a.prompts) == 2
        await pool.close()

    run(go())


def test_a_busy_replica_sends_the_request_elsewhere_but_stays_in_the_rotation():
    async def go():
        pool = pool_of([A, B], policy="round_robin")
        pool.fakes[A].fail_before = EngineBusyError("full")
        assert [await answer(pool, [1] * 20) for _ in range(2)] == [[1, 2, 3]] * 2
        assert pool.replicas[A].up
        await pool.close()

    run(go())


def test_a_started_stream_is_not_moved_and_a_refused_request_is_not_retried():
    async def go():
        pool = pool_of([A, B], policy="round_robin")
        for fake in pool.fakes.values():
            fake.fail_after = aiohttp.ClientPayloadError("cut")
        with pytest.raises(aiohttp.ClientPayloadError):
            await answer(pool, [1] * 20)
        assert sum(len(f.prompts) for f in pool.fakes.values()) == 1
        pool = pool_of([A, B], policy="round_robin")
        for fake in pool.fakes.values():
            fake.fail_before = EngineRequestError("bad", param="top_p")
        with pytest.raises(EngineRequestError):
            await answer(pool, [1] * 20)
        assert sum(len(f.prompts) for f in pool.fakes.values()) == 1
        assert all(r.up for r in pool.replicas.values())

    run(go())


def test_with_no_replica_up_a_request_fails_at_once_and_readiness_says_so():
    async def go():
        pool = pool_of([A, B])
        for fake in pool.fakes.values():
            fake.healthy = False
        await pool.refresh()
        assert not await pool.ready()
        with pytest.raises(EngineClosedError):
            await answer(pool, [1] * 20)
        assert not any(f.prompts for f in pool.fakes.values())
        pool.fakes[B].healthy = True
        await pool.refresh()
        assert await pool.ready()
        await pool.close()

    run(go())


def test_readiness_before_the_first_probe_asks_the_replicas():
    # Replicas start "up" (requests are not refused while the first probes run), but /readyz
    # asked in that window must not answer on that guess.
    async def go():
        pool = pool_of([A, B])
        for fake in pool.fakes.values():
            fake.healthy = False
        assert not await pool.ready()  # no refresh yet: ready() probes itself
        pool.fakes[A].healthy = True
        await pool.refresh()
        assert await pool.ready()
        await pool.close()

    run(go())


def test_probes_read_the_runners_load_and_block_size():
    async def go():
        pool = pool_of([A, B])
        pool.fakes[A].in_flight_reported = 7
        await pool.refresh()
        assert pool.replicas[A].load == 7 and pool.block_size == BS

    run(go())


def test_a_host_name_resolving_to_several_addresses_is_one_replica_each_re_resolved():
    answers = {"runners.example": ["10.0.0.1", "10.0.0.2"]}

    async def resolver(host, port):
        return answers[host]

    async def go():
        pool = pool_of(["http://runners.example:3001"], resolver=resolver, dns_refresh=0.0)
        assert pool.dynamic  # a name may resolve to more later: resolved from the start
        await pool.refresh()
        assert sorted(pool.replicas) == ["http://10.0.0.1:3001", "http://10.0.0.2:3001"]
        answers["runners.example"] = ["10.0.0.2", "10.0.0.3"]  # a pod replaced
        await pool.refresh()
        assert sorted(pool.replicas) == ["http://10.0.0.2:3001", "http://10.0.0.3:3001"]
        assert pool.fakes["http://10.0.0.1:3001"].closed  # retired once idle
        answers["runners.example"] = ["10.0.0.3"]  # one address: the name as given
        await pool.refresh()
        assert list(pool.replicas) == ["http://runners.example:3001"]
        await pool.close()

    run(go())


def test_the_prefix_index_is_bounded_and_expires():
    index = PrefixIndex(capacity=3, ttl=10.0)
    index.add([b"a", b"b", b"c", b"d"], now=0.0)
    assert len(index) == 3 and index.match([b"a"], 0.0) == 0  # the oldest went first
    assert index.match([b"b", b"c", b"x"], 5.0) == 2
    assert index.match([b"b", b"c"], 11.0) == 0


def test_series_are_parsed_without_labels():
    text = '# TYPE x gauge\nx 3.0\ny{a="1"} 4\nz 1e3\n'
    assert parse_series(text) == {"x": 3.0, "z": 1000.0}


def test_two_api_workers_each_with_its_own_index_agree_on_a_conversations_replica():
    """No shared state: the rendezvous tie-break on the first block past the common prefix
    sends turn 2, arriving at the other worker, where turn 1 went."""

    async def go():
        one, two = pool_of([A, B, C]), pool_of([A, B, C])
        system = list(range(5 * BS))  # a tenant's system prompt, on every replica already
        for pool in (one, two):
            for replica in pool.replicas.values():
                replica.index.add(chain_hashes(system, BS), 0.0)
                replica.index.ttl = float("inf")
        for user in range(8):
            turn1 = system + [10_000 + 100 * user + i for i in range(2 * BS)]
            turn2 = turn1 + [4] * (3 * BS)
            await answer(one, turn1)
            await answer(two, turn2)
            assert served_by(one, turn1) == served_by(two, turn2)
        assert len({served_by(one, system + [10_000 + 100 * u + i for i in range(2 * BS)])[0]
                    for u in range(8)}) > 1  # fmt: skip

    run(go())
