"""bindings/grammar.py: schemas compile once, and what the converter would silently drop is refused by name."""

from __future__ import annotations

import pytest

from bindings import grammar
from bindings.grammar import UnsupportedSchemaError, schema_grammar


def test_the_same_schema_compiles_once() -> None:
    schema = {"type": "object", "properties": {"unit-test-cache": {"type": "boolean"}}, "required": ["unit-test-cache"]}
    before = grammar.cache_info()
    first = schema_grammar(schema)
    second = schema_grammar(dict(schema))  # an equal schema, another object: still a cache hit
    after = grammar.cache_info()
    assert first == second
    assert after.misses == before.misses + 1
    assert after.hits == before.hits + 1
    assert first.startswith('boolean ::= ("true" | "false") space')
    assert 'root ::= "{" space unit-test-cache-kv "}" space' in first


def test_strings_exclude_raw_control_characters() -> None:
    # JSON forbids raw U+0000..U+001F inside strings; the converter's own char rule would allow them.
    assert 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |' in schema_grammar({"type": "string"})


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "integer", "exclusiveMaximum": 3}, "schema: unsupported JSON Schema keyword(s) exclusiveMaximum"),
        ({"type": "string", "format": "uri"}, "schema: format 'uri' is not supported"),
        (
            {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}], "maxLength": 2}}},
            "schema.properties.a: anyOf combined with maxLength is not supported",
        ),
        ({"type": "array", "items": {}}, "schema: items must be a non-empty schema object"),
        ({"type": "string", "pattern": "^x$"}, "schema: unsupported JSON Schema keyword(s) pattern"),
    ],
)
def test_unsupported_feature_is_named(schema: dict[str, object], message: str) -> None:
    with pytest.raises(UnsupportedSchemaError) as caught:
        schema_grammar(schema)
    assert str(caught.value) == message
