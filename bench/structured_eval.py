"""Do structured answers finish? 24 pydantic models, tools and JSON objects through a served
model, with the closing guard (runners/closing.py) on and off, as a new user asks for them.

    python -m bench.structured_eval                       # native engine, guard on and off
    python -m bench.structured_eval --engine vllm --python .venv-vllm/bin/python

Each case is asked greedy and sampled (temperature 0.8, a fixed seed), at its budget
(``max_tokens`` 300 for pydantic models, 120 for tools and ``json_object``, the figures of the
issue) and at half of it, through ``bentoml serve service:Monolith`` and the official openai
client: ``chat.completions.parse`` for pydantic models, ``create`` with ``tools`` and
``tool_choice`` for tools. An answer is good when it parses and validates (the SDK's pydantic
parse; each call's arguments against its tool's schema, a named tool called exactly once).

Reported (``--out``, default docs/structured/<engine>): how many answers are good with the
guard on and off, how often the runner closed an answer early (its own counters, at budget and
at a loop), whether answers that finished without help are byte-identical with it on and off,
and every answer (answers.jsonl).
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import json
import os
import platform
import sys
import urllib.request
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import jsonschema
import openai
from pydantic import BaseModel, Field

from bench.suite import server
from contract.settings import DEFAULT_MODEL
from tests.e2e.test_structured import TRIPLES_PROMPT, Triples  # the first case
from tests.served import free_port

SCHEMA_BUDGET, TOOL_BUDGET = 300, 120
TEMPERATURE, SEED = 0.8, 7


# ---------------------------------------------------------------- pydantic models


class CityInfo(BaseModel):
    name: str
    country: str
    population: int
    landmarks: list[str]


class Ingredient(BaseModel):
    name: str
    quantity: str


class Recipe(BaseModel):
    title: str
    ingredients: list[Ingredient]
    steps: list[str]


class SimpleRecipe(BaseModel):
    name: str
    servings: int
    vegetarian: bool
    ingredients: list[str]


class Product(BaseModel):
    name: str
    price: float


class Company(BaseModel):
    name: str
    founded: int
    ceo: str
    products: list[Product]


class Person(BaseModel):
    name: str
    age: int
    email: str | None
    hobbies: list[str]


class Genre(str, enum.Enum):
    drama = "drama"
    comedy = "comedy"
    action = "action"
    science_fiction = "science fiction"


class Movie(BaseModel):
    title: str
    year: int
    genre: Genre
    rating: float = Field(ge=0, le=10)


class Summary(BaseModel):
    summary: str
    key_points: list[str]


class Address(BaseModel):
    street: str
    city: str
    postcode: str
    country: str


class LineItem(BaseModel):
    description: str
    quantity: int
    unit_price: float


class Invoice(BaseModel):
    number: str
    items: list[LineItem]
    total: float


class Sentiment(BaseModel):
    label: Literal["positive", "negative", "neutral"]
    confidence: float


class HistoricEvent(BaseModel):
    year: int
    description: str


class Timeline(BaseModel):
    events: list[HistoricEvent]


class Question(BaseModel):
    question: str
    options: list[str]
    answer: int


class Quiz(BaseModel):
    questions: list[Question]


class Review(BaseModel):
    product: str
    pros: list[str]
    cons: list[str]
    score: int = Field(ge=1, le=5)


class Manager(BaseModel):
    name: str
    title: str


class Team(BaseModel):
    name: str
    size: int


class Department(BaseModel):
    name: str
    manager: Manager
    teams: list[Team]


class Meeting(BaseModel):
    title: str
    date: str
    attendees: list[str]
    agenda: list[str]
    location: str | None


MODELS: list[tuple[type[BaseModel], str]] = [
    (Triples, TRIPLES_PROMPT),
    (CityInfo, "Describe Paris."),
    (Recipe, "A recipe for pancakes."),
    (SimpleRecipe, "Give me a recipe for tomato soup."),
    (Company, "Describe a company that makes phones."),
    (Person, "Describe a person named Tom."),
    (Movie, "Recommend a movie."),
    (Summary, "Summarize the history of Rome in detail."),
    (Address, "My address is 10 Downing Street, London, SW1A 2AA."),
    (Invoice, "An invoice for two chairs at 40 and a table at 120."),
    (Sentiment, "Classify the sentiment: 'The food was awful.'"),
    (Timeline, "Key events of the Second World War."),
    (Quiz, "A quiz about the planets."),
    (Review, "Review a laptop."),
    (Department, "Describe an engineering department."),
    (Meeting, "Schedule a team meeting for next Monday about the budget."),
]  # fmt: skip

# ---------------------------------------------------------------- tools


def tool(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


ADD = tool("add", {"type": "object", "properties": {"a": {"type": "integer"},
           "b": {"type": "integer"}}, "required": ["a", "b"]})  # fmt: skip
WEATHER = tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"},
               "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]})  # fmt: skip
FLIGHTS = tool("search_flights", {"type": "object", "properties": {
    "origin": {"type": "string"}, "destination": {"type": "string"},
    "date": {"type": "string"}, "passengers": {"type": "integer", "minimum": 1},
    "cabin": {"enum": ["economy", "business"]}},
    "required": ["origin", "destination", "date", "passengers"]})  # fmt: skip
EVENT = tool("create_event", {"type": "object", "properties": {
    "title": {"type": "string"}, "attendees": {"type": "array", "items": {"type": "string"}},
    "start": {"type": "string"}, "duration_minutes": {"type": "integer"}},
    "required": ["title", "attendees", "start", "duration_minutes"]})  # fmt: skip
EMAIL = tool("send_email", {"type": "object", "properties": {
    "to": {"type": "string"}, "subject": {"type": "string"}, "body": {"type": "string"}},
    "required": ["to", "subject", "body"]})  # fmt: skip


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


TOOL_CASES: list[tuple[str, list[dict], Any, str]] = [
    ("add (named)", [ADD], named("add"), "What is 17 plus 25?"),
    ("get_weather (required)", [WEATHER, ADD], "required", "What is the weather in Oslo?"),
    ("search_flights (named)", [FLIGHTS], named("search_flights"),
     "Find flights from Paris to Rome on 2026-05-01 for 2 people."),
    ("create_event (auto)", [EVENT], "auto",
     "Create a meeting with Ann and Bob tomorrow at 10 for 30 minutes."),
    ("send_email (required)", [EMAIL], "required", "Email my boss that I am sick today."),
    ("add and get_weather (auto)", [ADD, WEATHER], "auto",
     "What is 2 plus 3, and what is the weather in Rome?"),
]  # fmt: skip

OBJECT_CASES = ["List two planets as JSON.", "Describe a cat as JSON."]


# ---------------------------------------------------------------- running


@dataclass
class Answer:
    case: str
    kind: str  # model | tools | json_object
    budget: int
    sampled: bool
    guard: bool
    good: bool = False
    finish: str | None = None
    error: str | None = None
    text: str | None = None  # the content, or the calls as JSON
    completion_tokens: int | None = None


def _sampling(sampled: bool) -> dict:
    return {"temperature": TEMPERATURE, "seed": SEED} if sampled else {"temperature": 0}


async def ask_model(client, model, prompt, budget, sampled, guard) -> Answer:
    answer = Answer(model.__name__, "model", budget, sampled, guard)
    try:
        out = await client.chat.completions.parse(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}],
            response_format=model, max_tokens=budget, **_sampling(sampled),
        )  # fmt: skip
        choice = out.choices[0]
        answer.finish, answer.text = choice.finish_reason, choice.message.content
        answer.completion_tokens = out.usage.completion_tokens
        answer.good = isinstance(choice.message.parsed, model)
    except (openai.APIError, openai.LengthFinishReasonError, ValueError) as exc:
        answer.error = _error(exc)
    return answer


async def ask_tools(client, name, tools, choice, prompt, budget, sampled, guard) -> Answer:
    answer = Answer(name, "tools", budget, sampled, guard)
    try:
        out = await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}], tools=tools,
            tool_choice=choice, max_tokens=budget, **_sampling(sampled),
        )  # fmt: skip
        message = out.choices[0].message
        answer.finish = out.choices[0].finish_reason
        answer.completion_tokens = out.usage.completion_tokens
        calls = message.tool_calls or []
        answer.text = json.dumps(
            {"content": message.content,
             "calls": [[c.function.name, c.function.arguments] for c in calls]}
        )  # fmt: skip
        schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
        for call in calls:
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
        if isinstance(choice, dict):  # named: exactly one call of it
            answer.good = [c.function.name for c in calls] == [choice["function"]["name"]]
        else:
            answer.good = bool(calls) or (choice == "auto" and bool(message.content))
    except (openai.APIError, jsonschema.ValidationError, ValueError) as exc:
        answer.error = _error(exc)
    return answer


async def ask_object(client, prompt, budget, sampled, guard) -> Answer:
    answer = Answer(prompt, "json_object", budget, sampled, guard)
    try:
        out = await client.chat.completions.create(
            model=DEFAULT_MODEL, messages=[{"role": "user", "content": prompt}],
            response_format={"type": "json_object"}, max_tokens=budget, **_sampling(sampled),
        )  # fmt: skip
        answer.finish = out.choices[0].finish_reason
        answer.text = out.choices[0].message.content
        answer.completion_tokens = out.usage.completion_tokens
        answer.good = isinstance(json.loads(answer.text or ""), dict)
    except (openai.APIError, ValueError) as exc:
        answer.error = _error(exc)
    return answer


def _error(exc: BaseException) -> str:
    body = getattr(exc, "body", None)
    if isinstance(body, dict) and "message" in body:
        return f"{getattr(exc, 'status_code', '')} {body.get('code')}: {body['message']}"[:400]
    return f"{type(exc).__name__}: {exc}"[:400]


def jobs(client, guard: bool, halves: bool = True) -> list:
    out = []
    for sampled in (False, True):
        for scale in (1, 2) if halves else (1,):
            for model, prompt in MODELS:
                out.append(ask_model(client, model, prompt, SCHEMA_BUDGET // scale, sampled, guard))
            for name, tools, choice, prompt in TOOL_CASES:
                out.append(ask_tools(client, name, tools, choice, prompt, TOOL_BUDGET // scale,
                                     sampled, guard))  # fmt: skip
            for prompt in OBJECT_CASES:
                out.append(ask_object(client, prompt, TOOL_BUDGET // scale, sampled, guard))
    return out


async def run_all(url: str, guard: bool, concurrency: int) -> list[Answer]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=900)
    gate = asyncio.Semaphore(concurrency)

    async def gated(job):
        async with gate:
            return await job

    return list(await asyncio.gather(*(gated(j) for j in jobs(client, guard))))


def runner_counters(url: str) -> dict[str, float]:
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = {}
    for line in text.splitlines():
        if line.startswith("llm_runner_structured_closed_"):
            name, value = line.rsplit(" ", 1)
            found[name.removeprefix("llm_runner_structured_closed_")] = float(value)
    return found


@dataclass
class Run:
    guard: bool
    answers: list[Answer]
    closed: dict[str, float] = field(default_factory=dict)


def serve_and_run(args, guard: bool, logs: Path) -> Run:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        "LLM_STRUCTURED_CLOSE": "true" if guard else "false",
        "LLM_STRUCTURED_LOOP_TOKENS": str(args.loop_tokens) if guard else "0",
        "BENTOML_DO_NOT_TRACK": "true",
    }
    if args.engine == "vllm":
        env["LLM_ENGINE"] = "vllm"
    bentoml = str(Path(args.python).parent / "bentoml")
    cmd = [bentoml, "serve", "service:Monolith", "--port", str(port)]
    with ExitStack() as stack:
        stack.enter_context(server(cmd, f"{url}/readyz", logs / f"server-{guard}.log", env, 900))
        answers = asyncio.run(run_all(url, guard, args.concurrency))
        return Run(guard, answers, runner_counters(url))


# ---------------------------------------------------------------- the report


def _key(a: Answer) -> tuple:
    return (a.kind, a.case, a.budget, a.sampled)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def report(args, runs: list[Run]) -> str:
    on = next(r for r in runs if r.guard)
    off = next((r for r in runs if not r.guard), None)
    lines = [
        f"# Structured answers that finish: {args.engine} engine",
        "",
        f"`python -m bench.structured_eval --engine {args.engine}` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d}, {cpu_name()}, "
        f"{os.cpu_count()} cores; the default model; {len(on.answers)} requests per run "
        f"({len(MODELS)} pydantic models, {len(TOOL_CASES)} tool cases, {len(OBJECT_CASES)} "
        f"json_object prompts; greedy and sampled at temperature {TEMPERATURE} seed {SEED}; "
        f"max_tokens {SCHEMA_BUDGET}/{TOOL_BUDGET} and half), {args.concurrency} at a time.",
        "",
        "| run | good | of | closed at budget | closed at a loop |",
        "|---|---|---|---|---|",
    ]
    for run in runs:
        good = sum(a.good for a in run.answers)
        lines.append(
            f"| guard {'on' if run.guard else 'off'} | {good} | {len(run.answers)} | "
            f"{run.closed.get('budget_total', 0):.0f} | {run.closed.get('loop_total', 0):.0f} |"
        )
    lines += ["", "By kind and budget (good answers, guard on / off):", ""]
    lines += ["| kind | budget | greedy | sampled |", "|---|---|---|---|"]
    groups: dict[tuple, list] = {}
    for a in on.answers:
        groups.setdefault((a.kind, "full" if a.budget in (SCHEMA_BUDGET, TOOL_BUDGET) else "half"),
                          []).append(a)  # fmt: skip
    offs = {_key(a): a for a in off.answers} if off else {}
    for (kind, scale), answers in sorted(groups.items()):
        cells = []
        for sampled in (False, True):
            mine = [a for a in answers if a.sampled == sampled]
            theirs = [offs[_key(a)] for a in mine if _key(a) in offs]
            cells.append(f"{sum(a.good for a in mine)}/{len(mine)}"
                         + (f" / {sum(a.good for a in theirs)}" if theirs else ""))  # fmt: skip
        lines.append(f"| {kind} | {scale} | {cells[0]} | {cells[1]} |")
    if off is not None:
        same = differ = 0
        changed = []
        for a in off.answers:
            if a.finish in ("stop", "tool_calls") and a.good:  # finished without help
                mine = next(b for b in on.answers if _key(b) == _key(a))
                if mine.text == a.text:
                    same += 1
                else:
                    differ += 1
                    changed.append(f"{a.case} ({a.budget}, {'sampled' if a.sampled else 'greedy'})")
        lines += [
            "",
            f"Answers that finished without help (guard off: finish_reason stop or tool_calls, "
            f"valid): {same} "
            f"of {same + differ} byte-identical with the guard on"
            + (f"; different: {', '.join(changed)} (closed at a loop: they repeated "
               f"themselves, see answers.jsonl)" if changed else "") + ".",
        ]  # fmt: skip
    failed = [a for a in on.answers if not a.good]
    if failed:
        lines += ["", "Not good with the guard on:", ""]
        lines += [f"- {a.case} ({a.budget}, {'sampled' if a.sampled else 'greedy'}): "
                  f"{a.error or a.text}" for a in failed]  # fmt: skip
    lines += ["", "Every answer: answers.jsonl (one line per request, both runs)."]
    return "\n".join(lines) + "\n"


def load_runs(out: Path) -> list[Run]:
    counters = json.loads((out / "runs.json").read_text())
    answers = [Answer(**json.loads(line)) for line in (out / "answers.jsonl").open()]
    return [
        Run(guard, [a for a in answers if a.guard == guard], counters["on" if guard else "off"])
        for guard in (True, False)
        if ("on" if guard else "off") in counters
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("native", "vllm"), default="native")
    parser.add_argument("--python", default=sys.executable, help="the venv that serves")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--loop-tokens", type=int, default=48)
    parser.add_argument("--guard", choices=("both", "on", "off"), default="both")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report-only", action="store_true",
                        help="write report.md again from answers.jsonl and runs.json")  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out or Path("docs/structured") / args.engine
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        runs = load_runs(out)
    else:
        runs = []
        logs = Path("bench/logs/structured") / args.engine
        for guard in {"both": (True, False), "on": (True,), "off": (False,)}[args.guard]:
            runs.append(serve_and_run(args, guard, logs))
            print(f"guard {'on' if guard else 'off'}: "
                  f"{sum(a.good for a in runs[-1].answers)}/{len(runs[-1].answers)} good, "
                  f"closed {runs[-1].closed}", flush=True)  # fmt: skip
        with (out / "answers.jsonl").open("w") as f:
            for run in runs:
                for a in run.answers:
                    f.write(json.dumps(asdict(a), ensure_ascii=False) + "\n")
        counters = {"on" if r.guard else "off": r.closed for r in runs}
        (out / "runs.json").write_text(json.dumps(counters, indent=1) + "\n")
    if any(r.guard for r in runs):
        (out / "report.md").write_text(report(args, runs))
        print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
