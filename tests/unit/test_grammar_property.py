"""Property: for any schema of a fixed family, every constrained answer validates against it.

Hypothesis draws JSON schemas (objects with string / integer / number / boolean / enum / array-of-X /
nested-object properties, a random subset required, arrays of 0..3 items), the live SmolLM2 server answers
each at temperature 1.0 with two choices, and `jsonschema` checks every answer. Strings, arrays and depth
are bounded, so an answer cut by max_tokens (the one case allowed not to validate) stays rare; the test
asserts that too. Derandomized with a fixed request seed, so CI draws the same schemas every run."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import httpx
import jsonschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.conftest import LiveServer, live_cache_home, smollm2_server

__all__ = ["live_cache_home", "smollm2_server"]  # the live server's fixtures, used here

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 400
N_EXAMPLES = 20
N_CHOICES = 2
MAX_TRUNCATED_SHARE = 0.1

Schema = dict[str, Any]

_names = st.from_regex(r"[a-z][a-z_]{0,9}", fullmatch=True)
_strings = st.builds(
    lambda low, extra: (
        {"type": "string", "minLength": low, "maxLength": low + extra}
        if low
        else {"type": "string", "maxLength": extra + 1}
    ),
    st.integers(0, 3),
    st.integers(0, 8),
)
_enums = st.one_of(
    st.lists(st.from_regex(r"[a-z]{1,6}", fullmatch=True), min_size=1, max_size=4, unique=True).map(
        lambda values: {"type": "string", "enum": values}
    ),
    st.lists(st.integers(-50, 50), min_size=1, max_size=4, unique=True).map(lambda values: {"enum": values}),
)
_scalars = st.one_of(
    _strings,
    st.just({"type": "integer"}),
    st.just({"type": "number"}),
    st.just({"type": "boolean"}),
    _enums,
)


def _arrays(items: st.SearchStrategy[Schema]) -> st.SearchStrategy[Schema]:
    return st.builds(
        lambda item, low, extra: {"type": "array", "items": item, "minItems": low, "maxItems": low + extra},
        items,
        st.integers(0, 1),
        st.integers(0, 2),
    )


@st.composite
def _objects(draw: st.DrawFn, values: st.SearchStrategy[Schema], max_properties: int) -> Schema:
    properties = draw(st.dictionaries(_names, values, min_size=1, max_size=max_properties))
    required = draw(st.lists(st.sampled_from(sorted(properties)), unique=True))
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_leaf_values = st.one_of(_scalars, _arrays(_scalars))
# Depth at most two below the root: a nested object holds scalars and arrays of scalars.
_nested = _objects(_leaf_values, max_properties=3)
schemas = _objects(st.one_of(_leaf_values, _nested, _arrays(_nested)), max_properties=4)


def _answers(server: LiveServer, schema: Schema) -> list[tuple[str, str]]:
    response = httpx.post(
        server.api_url + "/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "Answer with a JSON value for this schema."}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "drawn", "schema": schema}},
            "temperature": 1.0,
            "seed": 7,
            "n": N_CHOICES,
            "max_tokens": MAX_TOKENS,
        },
        timeout=120,
    )
    assert response.status_code == 200, (schema, response.text)  # every schema of the family is supported
    return [(choice["finish_reason"], choice["message"]["content"]) for choice in response.json()["choices"]]


def test_every_constrained_answer_validates(smollm2_server: LiveServer) -> None:
    finishes: Counter[str] = Counter()

    @settings(
        max_examples=N_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(schema=schemas)
    def check(schema: Schema) -> None:
        jsonschema.Draft202012Validator.check_schema(schema)
        for finish_reason, content in _answers(smollm2_server, schema):
            finishes[finish_reason] += 1
            if finish_reason == "length":
                continue  # cut short by max_tokens: the one answer allowed not to be complete JSON
            assert finish_reason == "stop", (schema, content)
            jsonschema.validate(json.loads(content), schema)

    check()
    total = sum(finishes.values())
    assert total >= N_EXAMPLES * N_CHOICES  # hypothesis ran the examples it was asked for
    assert finishes["length"] <= MAX_TRUNCATED_SHARE * total, finishes
