"""Many runner replicas behind one API: which replica serves each request, which replicas are
up, and what happens to a request when its replica fails.

Where the runners are (``LLM_RUNNER_URL``): one URL, a comma-separated list, and host names
that resolve to several addresses (a Kubernetes headless Service: one address per ready
pod), re-resolved every ``runner_dns_refresh`` seconds. One replica is today's path exactly:
no probing, no retry, every request to it.

**The routing rule** (``runner_routing=prefix``). The API has each prompt's token ids before
the runner does (it templates and tokenizes), so it computes the very block-hash chain the
runner's prefix cache keys its KV by (:func:`contract.prefix.chain_hashes`, at the block size
the runner reports) and keeps, per replica, an approximate index of the blocks it sent there
(bounded, least recently used first out, expiring). Then, with ``load`` = the requests in
flight on a replica (this worker's own count, or what the runner last reported, whichever is
larger):

1. the candidates are the replicas within ``runner_balance_slack`` requests of the least
   loaded one;
2. when a candidate holds at least ``runner_prefix_min_match`` of the prompt's full blocks
   (a later turn of a conversation), the candidate holding the longest run of its leading
   blocks serves it: reason ``prefix`` (``balance`` when a replica holding more was too
   busy);
3. otherwise (a new conversation: at most a shared system prompt is held anywhere) any
   candidate will do: a rendezvous hash on the first block no replica is known to hold
   picks it (reason ``hash``), so that every API worker, each with an index of its own,
   sends a new conversation and its later turns to the same replica without sharing state,
   and new conversations spread rather than pile onto the replica that happens to hold the
   shared prompt; a prompt shorter than a block goes to the least loaded.

This is SGLang's cache-aware rule (go for the cache when the match is worth it and loads are
balanced; otherwise spread) with its balance threshold in requests rather than a ratio;
NVIDIA Dynamo's KV router weighs the blocks to prefill against active blocks in one cost
instead. The slack is what a cache hit may cost in queueing: on a replica ``slack`` requests
busier, each step carries that many more sequences, a few per cent of a decode step each on
a GPU (decode is memory-bound), while a hit saves the prefill of every matched block. The
defaults (slack 2, a half of the blocks, SGLang's cache threshold) are where ``make
bench-replicas`` measured TTFT and throughput at their best with balance within 1.5x; the
sweep is in ``docs/replicas/``.
``least_loaded`` and ``round_robin`` are there for comparison. The ``n`` choices of one
request go to one replica (the first choice's, by request id), which computes their prompt
once.

**Health.** Every ``runner_probe_interval`` seconds each replica's ``/readyz`` is asked, and
its ``/metrics`` for its load and block size. A replica that refuses a connection, drops one
before answering, or fails its readiness is out of the rotation until it answers again.

**Failover.** A request that has received no token yet is sent once more, to another replica
(``retry``), when its replica could not be reached, dropped it, is stopping, or is at
capacity; one that has started streaming cannot be moved (its tokens were sampled there) and
ends with the runner-unavailable error (a clean error event in a stream). With no replica up,
a request fails at once with a 503. Every attempt's outcome is counted
(``llm_api_runner_requests_total``).

No torch here: the API process imports this module.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import logging
import math
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlparse, urlunparse

import aiohttp
from prometheus_client import Counter, Gauge
from pydantic import SecretStr

from api.runner_client import RunnerClient
from contract.errors import EngineBusyError, EngineClosedError
from contract.prefix import DEFAULT_BLOCK_SIZE, chain_hashes
from contract.tokens import GenerationChunk, SamplingParams

logger = logging.getLogger(__name__)

Policy = Literal["prefix", "least_loaded", "round_robin"]
POLICIES: tuple[Policy, ...] = ("prefix", "least_loaded", "round_robin")

# Errors before the first token after which another replica may serve the request: it could
# not be reached or dropped the connection (the transport), is stopping, or is at capacity.
# Not a refused request (the same on every replica) nor a timeout (it would double the wait).
_TRANSPORT = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, OSError)
_RETRYABLE = (*_TRANSPORT, EngineClosedError, EngineBusyError)
_AFFINITY_SECONDS = 60.0  # how long the n choices of one request keep to its replica

ROUTED = Counter(
    "llm_api_runner_routed",
    "Requests sent to each runner replica, by why it was chosen (prefix: the longest cached "
    "prefix; hash: no replica known to hold more of it, placed by rendezvous hash (a new "
    "conversation); balance: the least loaded; round_robin; only_one_up; retry: after a "
    "failure elsewhere; affinity: another choice of the same request).",
    ["replica", "reason"],
)
OUTCOMES = Counter(
    "llm_api_runner_requests",
    "Attempts on each runner replica by outcome: finished, cancelled (the client left or a "
    "deadline), refused (the engine's own error, e.g. a 400), failed_before_token (then "
    "retried elsewhere or failed), failed_mid_stream.",
    ["replica", "outcome"],
)
REPLICA_IN_FLIGHT = Gauge(
    "llm_api_runner_in_flight",
    "Requests this API has in flight on each runner replica.",
    ["replica"],
    multiprocess_mode="livesum",
)
REPLICA_UP = Gauge(
    "llm_api_runner_up",
    "1 while a runner replica is in the rotation, 0 while it is out (any API worker's view).",
    ["replica"],
    multiprocess_mode="livemax",
)
PREFIX_BLOCKS = Counter(
    "llm_api_router_prompt_blocks",
    "Full KV blocks of the prompts routed (total), and of those, the blocks the chosen "
    "replica was expected to hold (matched): the router's view of the prefix-hit fraction.",
    ["kind"],
)


class PrefixIndex:
    """The block hashes this API worker sent to one replica: an approximation of what its
    prefix cache holds (bounded; least recently used first out; expiring, as the runner evicts
    too)."""

    def __init__(self, capacity: int, ttl: float):
        self.capacity = capacity
        self.ttl = ttl
        self._seen: OrderedDict[bytes, float] = OrderedDict()  # hash -> last sent

    def __len__(self) -> int:
        return len(self._seen)

    def match(self, hashes: list[bytes], now: float) -> int:
        """How many of ``hashes``, from the first, were sent here within the ttl."""
        count = 0
        for digest in hashes:
            seen = self._seen.get(digest)
            if seen is None or now - seen > self.ttl:
                break
            count += 1
        return count

    def add(self, hashes: Iterable[bytes], now: float) -> None:
        for digest in hashes:
            self._seen[digest] = now
            self._seen.move_to_end(digest)
        while len(self._seen) > self.capacity:
            self._seen.popitem(last=False)

    def clear(self) -> None:
        self._seen.clear()


@dataclass(eq=False)
class Replica:
    """One runner replica, as this API worker sees it."""

    url: str
    client: RunnerClient
    index: PrefixIndex
    up: bool = True  # until a probe or a request says otherwise
    in_flight: int = 0  # this worker's requests on it
    reported: int = 0  # running + waiting, as its /metrics last said (all API workers')
    block_size: int | None = None
    retired: bool = False  # no longer in the rotation (DNS dropped it); closed when idle

    @property
    def load(self) -> int:
        return max(self.in_flight, self.reported)

    def mark(self, up: bool, why: str = "") -> None:
        if up != self.up:
            if up:
                logger.info("runner replica %s is back in the rotation", self.url)
            else:
                logger.warning("runner replica %s is out of the rotation: %s", self.url, why)
        self.up = up
        REPLICA_UP.labels(replica=self.url).set(int(up))


@dataclass(frozen=True)
class RouterSettings:
    """The router's knobs; their defaults are stated once, on the API's settings
    (``APISettings.router_options``, read from ``LLM_RUNNER_ROUTING`` and its kin)."""

    policy: Policy
    balance_slack: int
    min_match: float
    probe_interval: float
    dns_refresh: float
    index_blocks: int
    index_ttl: float


@dataclass
class _Source:
    """One entry of ``LLM_RUNNER_URL``: a URL, and for a host name over plain HTTP, the
    addresses it resolved to last."""

    url: str
    host: str | None = None  # a name to resolve (else the URL is used as given)
    addresses: list[str] = field(default_factory=list)


def parse_runner_urls(value: str) -> list[str]:
    """``LLM_RUNNER_URL``'s entries: comma-separated, whitespace ignored, duplicates once."""
    urls = [part.strip().rstrip("/") for part in value.split(",")]
    return list(dict.fromkeys(url for url in urls if url))


def _needs_resolving(url: str) -> str | None:
    """The host name of an ``http://`` URL, to be resolved to its addresses; None for an
    address, a socket, or HTTPS (its certificate names the host: used as given)."""
    parsed = urlparse(url)
    if parsed.scheme != "http" or not parsed.hostname:
        return None
    try:
        ipaddress.ip_address(parsed.hostname)
        return None
    except ValueError:
        return parsed.hostname


def _with_host(url: str, address: str) -> str:
    parsed = urlparse(url)
    host = f"[{address}]" if ":" in address else address
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    return urlunparse(parsed._replace(netloc=netloc))


Resolver = Callable[[str, int | None], Awaitable[list[str]]]


async def resolve(host: str, port: int | None) -> list[str]:
    """The host's addresses, IPv4 first (a name that has both, such as ``localhost``, is one
    server, not two: its IPv6 addresses count only when it has no IPv4 one)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET6})
    return v4 or v6


class RunnerPool:
    """The runner replicas of one API worker, and the request path over them."""

    def __init__(
        self,
        urls: list[str],
        settings: RouterSettings,
        make_client: Callable[[str], RunnerClient],
        *,
        metrics_key: SecretStr | None = None,
        resolver: Resolver = resolve,
    ):
        if not urls:
            raise ValueError("no runner URL")
        self.settings = settings
        self._make_client = make_client
        self._metrics_key = metrics_key
        self._resolver = resolver
        self._sources = [_Source(url, _needs_resolving(url)) for url in urls]
        self.replicas: dict[str, Replica] = {}
        self._retired: list[Replica] = []
        for source in self._sources:  # until resolved: the URL as given
            self._add(source.url)
        self._turn = itertools.count()
        self._affinity: dict[str, tuple[Replica, float]] = {}
        self._task: asyncio.Task | None = None
        self._resolved_at = -float("inf")
        self._probed = False  # a probe round has finished: until then `up` is only a guess

    # -- what there is ------------------------------------------------------------------------

    @property
    def dynamic(self) -> bool:
        """Whether replicas come and go: several, or a host name that may resolve to several."""
        return len(self.replicas) > 1 or self._resolving

    @property
    def _resolving(self) -> bool:
        return any(s.host for s in self._sources)

    @property
    def block_size(self) -> int:
        sizes = [r.block_size for r in self.replicas.values() if r.block_size]
        return sizes[0] if sizes else DEFAULT_BLOCK_SIZE

    @property
    def single(self) -> Replica | None:
        """The one replica, when there is exactly one now (a host name that resolves to one
        address is used as given): then every request goes to it, as with no router."""
        if len(self.replicas) == 1:
            return next(iter(self.replicas.values()))
        return None

    def _add(self, url: str) -> Replica:
        replica = Replica(
            url,
            self._make_client(url),
            PrefixIndex(self.settings.index_blocks, self.settings.index_ttl),
        )
        self.replicas[url] = replica
        REPLICA_UP.labels(replica=url).set(1)
        return replica

    # -- background: DNS and probes ---------------------------------------------------------

    def start(self) -> None:
        """Start probing (inside the worker's event loop; idempotent)."""
        if self.dynamic and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watch must outlive any one failure
                logger.exception("runner replica probe failed")
            await asyncio.sleep(self.settings.probe_interval)

    async def refresh(self) -> None:
        """Re-resolve host names when due, then probe every replica once."""
        now = time.monotonic()
        if self._resolving and now - self._resolved_at >= self.settings.dns_refresh:
            self._resolved_at = now
            await self._resolve_all()
        if len(self.replicas) > 1:  # one alone is not taken out of the rotation
            await asyncio.gather(*(self._probe(r) for r in list(self.replicas.values())))
            self._probed = True
        for replica in [r for r in self._retired if r.in_flight == 0]:
            self._retired.remove(replica)
            await replica.client.close()

    async def _resolve_all(self) -> None:
        wanted: list[str] = []
        for source in self._sources:
            if source.host is None:
                wanted.append(source.url)
                continue
            try:
                source.addresses = await self._resolver(source.host, urlparse(source.url).port)
            except OSError as exc:  # keep the last answer: a DNS hiccup is not an outage
                logger.warning("cannot resolve %s (%s): keeping %s", source.host, exc,
                               source.addresses or "the URL as given")  # fmt: skip
            if len(source.addresses) > 1:
                wanted += [_with_host(source.url, a) for a in source.addresses]
            else:  # one address (or none known): the URL as given, as with a single runner
                wanted.append(source.url)
        wanted = list(dict.fromkeys(wanted))
        for url in wanted:
            if url not in self.replicas:
                logger.info("runner replica %s joins the rotation", url)
                self._add(url)
        for url in [u for u in self.replicas if u not in wanted]:
            logger.info("runner replica %s leaves the rotation (no longer resolved)", url)
            replica = self.replicas.pop(url)
            replica.retired = True
            REPLICA_UP.labels(replica=url).set(0)
            self._retired.append(replica)

    async def _probe(self, replica: Replica) -> None:
        timeout = min(2.0, self.settings.probe_interval)
        if not await replica.client.ready(timeout=timeout):
            replica.mark(False, "its /readyz did not answer 200")
            return
        values = parse_series(await replica.client.metrics(self._metrics_key, timeout=timeout))
        if "llm_runner_requests_in_flight" in values:
            replica.reported = int(values["llm_runner_requests_in_flight"])
        if values.get("llm_runner_kv_cache_block_tokens"):
            replica.block_size = int(values["llm_runner_kv_cache_block_tokens"])
        replica.mark(True)

    async def ready(self) -> bool:
        """Whether a request could be served now: some replica is up (asked now, when there
        is one replica or no probe has run yet)."""
        self.start()
        if self._resolving and self._resolved_at == -float("inf"):
            await self.refresh()
        if len(self.replicas) > 1 and not self._probed:
            # Replicas start "up" so that requests are not refused while the first probes
            # run; readiness must not rest on that guess (a /readyz in that window said 200
            # with no replica listening).
            await self.refresh()
        if self.single is not None:
            return await self.single.client.ready()
        return any(r.up for r in self.replicas.values())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for replica in [*self.replicas.values(), *self._retired]:
            await replica.client.close()

    # -- choosing ---------------------------------------------------------------------------

    def pick(
        self, hashes: list[bytes], exclude: Iterable[Replica] = ()
    ) -> tuple[Replica, str, int]:
        """The replica for a prompt with these block hashes, why, and how many of its blocks
        that replica is expected to hold. Raises EngineClosedError when none is up."""
        excluded = set(exclude)
        up = [r for r in self.replicas.values() if r.up and r not in excluded]
        if not up:
            raise EngineClosedError("no runner replica is up")
        if len(up) == 1:
            return up[0], "only_one_up", 0
        turn = next(self._turn)
        # A rotating order breaks ties: equal replicas take turns.
        order = {r: (i - turn) % len(up) for i, r in enumerate(up)}
        policy = self.settings.policy
        if policy == "round_robin":
            return min(up, key=order.__getitem__), "round_robin", 0
        least = min(r.load for r in up)
        if policy == "least_loaded":
            return min(up, key=lambda r: (r.load, order[r])), "balance", 0
        candidates = [r for r in up if r.load <= least + self.settings.balance_slack]
        if not hashes:  # shorter than a block: nothing to go by
            return min(candidates, key=lambda r: (r.load, order[r])), "balance", 0
        now = time.monotonic()
        matched = {r: r.index.match(hashes, now) for r in up}
        known = max(matched.values())  # the longest run of it any replica is known to hold
        longest = max(matched[r] for r in candidates)
        worth = max(1, math.ceil(self.settings.min_match * len(hashes)))
        if longest >= worth:  # a hit worth going for: the candidates holding the most
            tied = [r for r in candidates if matched[r] == longest]
            reason = "prefix"
        else:
            # No candidate holds enough of it (a new conversation: at most a shared system
            # prompt, which every replica soon holds): any candidate will do, chosen by a
            # rendezvous hash on the first block no replica is known to hold, so that every
            # API worker, each with an index of its own, sends it (and then its later turns)
            # to the same replica without sharing any state, and new conversations spread.
            tied = candidates
            reason = "hash"
        if len(tied) == 1:
            best = tied[0]
        else:
            key = hashes[min(known, len(hashes) - 1)]
            best = max(tied, key=lambda r: hashlib.blake2b(key + r.url.encode(),
                                                           digest_size=8).digest())  # fmt: skip
        if known >= worth and matched[best] < known:  # a replica holding more was too busy
            reason = "balance"
        return best, reason, matched[best]

    def _choose(
        self, prompt_ids: list[int], request_id: str | None, exclude: list[Replica]
    ) -> tuple[Replica, list[bytes]]:
        hashes = (
            chain_hashes(prompt_ids, self.block_size) if self.settings.policy == "prefix" else []
        )
        now = time.monotonic()
        if request_id and not exclude:
            kept = self._affinity.get(request_id)
            if kept and kept[0].up and not kept[0].retired and now - kept[1] < _AFFINITY_SECONDS:
                ROUTED.labels(replica=kept[0].url, reason="affinity").inc()
                return kept[0], hashes
        replica, reason, matched = self.pick(hashes, exclude)
        ROUTED.labels(replica=replica.url, reason="retry" if exclude else reason).inc()
        if hashes:
            PREFIX_BLOCKS.labels(kind="total").inc(len(hashes))
            PREFIX_BLOCKS.labels(kind="matched").inc(matched)
            replica.index.add(hashes, now)
        if request_id:
            if len(self._affinity) > 4096:  # old entries out, so this stays small
                self._affinity = {k: v for k, v in self._affinity.items()
                                  if now - v[1] < _AFFINITY_SECONDS}  # fmt: skip
            self._affinity[request_id] = (replica, now)
        return replica, hashes

    # -- the request path -------------------------------------------------------------------

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, *, request_id: str | None = None
    ) -> AsyncIterator[GenerationChunk]:
        """The generation's chunks from one replica; sent once more, to another, when the
        first fails before any token (see the module's docstring)."""
        self.start()
        single = self.single
        if single is not None:  # one runner: today's path, every request to it
            async for chunk in single.client.generate(prompt_ids, params, request_id=request_id):
                yield chunk
            return
        tried: list[Replica] = []
        while True:
            replica, hashes = self._choose(prompt_ids, request_id, tried)
            tried.append(replica)
            started = False
            outcome = "cancelled"
            generated: list[int] = []
            replica.in_flight += 1
            REPLICA_IN_FLIGHT.labels(replica=replica.url).inc()
            stream = replica.client.generate(prompt_ids, params, request_id=request_id)
            try:
                async with contextlib.aclosing(stream):
                    async for chunk in stream:
                        started = True
                        generated += chunk.token_ids
                        yield chunk
                outcome = "finished"
                return
            except _RETRYABLE as exc:
                outcome = "failed_mid_stream" if started else "failed_before_token"
                if isinstance(exc, asyncio.TimeoutError):  # waited out: not tried twice
                    raise
                if not isinstance(exc, EngineBusyError):
                    replica.mark(False, f"{type(exc).__name__}: {exc}")
                if started or len(tried) > 1 or not self._others_up(tried):
                    raise
                logger.warning("runner replica %s failed before any token (%s): retrying on "
                               "another", replica.url, type(exc).__name__)  # fmt: skip
            except Exception:
                outcome = "failed_mid_stream" if started else "refused"
                raise
            finally:
                replica.in_flight -= 1
                REPLICA_IN_FLIGHT.labels(replica=replica.url).dec()
                OUTCOMES.labels(replica=replica.url, outcome=outcome).inc()
                if outcome == "finished" and hashes and generated:
                    # The runner caches the answer's full blocks too: a conversation's next
                    # turn starts with them.
                    more = chain_hashes(prompt_ids + generated, self.block_size,
                                        hashes[-1], start=len(hashes))  # fmt: skip
                    replica.index.add(more, time.monotonic())

    def _others_up(self, tried: list[Replica]) -> bool:
        return any(r.up and r not in tried for r in self.replicas.values())


def parse_series(text: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text page, by name."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        if "{" in name:
            continue
        with contextlib.suppress(ValueError):
            values[name] = float(rest.split()[0])
    return values
