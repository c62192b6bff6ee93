"""Structured outputs on the real model through `bentoml serve`, as users ask for them: the
openai SDK's ``chat.completions.parse`` with pydantic models (``$defs``/``$ref`` included).
Every answer parses and validates, and ends well inside its token budget."""

from __future__ import annotations

import enum
import json
import os
import urllib.request
from collections.abc import Iterator
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from contract.settings import DEFAULT_MODEL
from tests.conftest import USER_BENTOML_HOME
from tests.e2e.test_serve import default_model_in_store
from tests.served import BENTOML, ServedProcess, free_port

BUDGET = 300


class Colour(str, enum.Enum):
    RED = "red"
    GREEN = "green"
    BLUE = "blue"


class City(BaseModel):
    name: str
    country: str


class Person(BaseModel):
    name: str
    age: int = Field(ge=0, le=130)
    city: City  # nested: $defs and $ref in the schema


class Item(BaseModel):
    name: str
    quantity: int = Field(ge=1, le=100)


class ShoppingList(BaseModel):
    items: list[Item] = Field(max_length=5)  # an array of objects


class Paint(BaseModel):
    colour: Colour  # an enum
    litres: float = Field(gt=0, le=20)


class Verdict(BaseModel):
    sentiment: Literal["positive", "negative", "neutral"]  # a literal
    confidence: float = Field(ge=0, le=1)


class Book(BaseModel):
    title: str
    author: str
    year: int = Field(ge=1000, le=2100)
    subtitle: str | None = None  # optional


class Capital(BaseModel):
    country: str
    capital: str


class Arithmetic(BaseModel):
    question: str
    answer: int


class Weather(BaseModel):
    city: str
    temperature_c: int = Field(ge=-60, le=60)
    sunny: bool


class Tags(BaseModel):
    tags: list[str] = Field(min_length=1, max_length=4)


class Event(BaseModel):
    name: str
    attendees: list[Person] = Field(max_length=2)  # nested arrays of nested objects


class Flags(BaseModel):
    enabled: bool
    level: Literal[1, 2, 3]


CASES: list[tuple[type[BaseModel], str]] = [
    (Person, "Describe a person named Anna, 34, who lives in Rome, Italy."),
    (ShoppingList, "Make a shopping list with apples and bread."),
    (Paint, "I need 3 litres of blue paint."),
    (Verdict, "Classify the sentiment of: 'I love this phone!'"),
    (Book, "Give me a famous book."),
    (Capital, "What is the capital of France?"),
    (Arithmetic, "What is 12 plus 30?"),
    (Weather, "It is sunny and 25 degrees in Madrid."),
    (Tags, "Give tags for a post about hiking in the Alps."),
    (Event, "A birthday party with two guests."),
    (Flags, "Turn the feature on at level 2."),
    (City, "Name a city in Japan."),
]


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    if not default_model_in_store():
        pytest.skip(f"{DEFAULT_MODEL} is not in {USER_BENTOML_HOME}: run `make model`")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    env.update(BENTOML_HOME=USER_BENTOML_HOME, BENTOML_DO_NOT_TRACK="true")
    with ServedProcess([BENTOML, "serve", "service:ChatAPI"], port=free_port(), env=env) as served:
        yield openai.OpenAI(base_url=f"{served.url}/v1", api_key="x", max_retries=0, timeout=300)


@pytest.mark.parametrize(("model", "prompt"), CASES, ids=[m.__name__ for m, _ in CASES])
def test_parse_returns_a_valid_instance_well_inside_the_budget(client, model, prompt):
    completion = client.chat.completions.parse(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": prompt}],
        response_format=model,
        max_tokens=BUDGET,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, model)
    assert completion.usage.completion_tokens < BUDGET // 2


def test_sampled_answers_parse_too(client):
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Describe someone."}],
            response_format=Person,
            max_tokens=BUDGET,
            temperature=1.0,
            seed=seed,
        )
        assert isinstance(completion.choices[0].message.parsed, Person)


def test_streamed_json_object_is_compact_and_parses(client):
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[
            {"role": "user", "content": "Give me a JSON object with the name and age of a cat."}
        ],
        response_format={"type": "json_object"},
        max_tokens=BUDGET,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert isinstance(json.loads(text), dict)
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


# ---------------------------------------------------------------- answers that finish


class Triple(BaseModel):
    subject: str
    relation: str
    object: str


class Triples(BaseModel):
    triples: list[Triple]


TRIPLES_PROMPT = (
    "Extract the facts as triples: Marie Curie was born in Warsaw and won the Nobel Prize."
)


@pytest.mark.parametrize("budget", [300, 60])
def test_an_answer_that_loops_is_closed_validly_within_its_budget(client, budget):
    # The default model repeats triples under greedy decoding until any budget runs out; the
    # runner closes the list (at the loop, or before the budget) and the SDK parses it.
    completion = client.chat.completions.parse(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": TRIPLES_PROMPT}],
        response_format=Triples,
        max_tokens=budget,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Triples) and choice.message.parsed.triples
    assert completion.usage.completion_tokens <= budget


def closed_early(client: openai.OpenAI) -> float:
    """The API's count of answers the runner closed early (at a loop or the budget)."""
    url = str(client.base_url).rstrip("/").removesuffix("/v1") + "/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("llm_api_structured_closed_total")
    )


def test_the_closed_answers_are_counted(client):
    before = closed_early(client)
    test_an_answer_that_loops_is_closed_validly_within_its_budget(client, 60)
    assert closed_early(client) == before + 1


def test_a_streamed_json_object_is_closed_within_its_budget(client):
    # "List two planets as JSON." writes a key that never closes; 40 tokens would cut it.
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL,
        messages=[{"role": "user", "content": "List two planets as JSON."}],
        response_format={"type": "json_object"},
        max_tokens=40,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage.completion_tokens <= 40


def test_a_budget_too_small_for_any_valid_answer_is_a_422_that_says_it_was_cut(client):
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.parse(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": TRIPLES_PROMPT}],
            response_format=Triples,
            max_tokens=3,
            temperature=0,
        )
    body = caught.value.body
    assert body["code"] == "response_format_not_met" and body["param"] == "max_tokens"
    assert "cut by max_tokens (3 tokens)" in body["message"]
    assert "does not match" not in body["message"]
