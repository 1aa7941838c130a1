"""JSON schemas → GBNF grammars for constrained decoding (OpenAI's `response_format`).

The conversion is llama-cpp-python's own (llama_cpp.llama_grammar.SchemaConverter, a port of llama.cpp's
json_schema_to_grammar); this module only decides which schemas it converts faithfully. The converter
silently drops what it does not understand (minimum, uniqueItems, unknown formats, ...) and would then
constrain to a looser language than the schema: an answer that parses but does not validate. So every
keyword is checked against the set the converter honours first, and anything else is refused by name.

It imports only the pure-Python grammar module (no model, no llama.cpp library calls), so the API layer
may call it at request time. Conversions are cached: the same schema compiles once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter

# Keywords that only describe (validators ignore them, so the grammar may too).
_ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly"}
    | {"writeOnly", "$defs", "definitions"}
)
# Keywords the converter turns into grammar rules (with the combinations checked in _check_node). Not
# "pattern": its regex translation emits pattern characters raw inside the JSON string (a `"` or a control
# character from `.` would make the answer unparseable).
_CONSTRAINTS = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const"}
    | {"anyOf", "$ref", "format", "minLength", "maxLength"}
)
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"})

# The grammar for `{"type": "json_object"}`: any JSON object (llama-cpp-python's built-in JSON grammar).
JSON_OBJECT_GRAMMAR = JSON_GBNF


class UnsupportedSchemaError(ValueError):
    """The schema uses something the grammar cannot enforce; the message names it and where."""


def schema_grammar(schema: Mapping[str, Any]) -> str:
    """The GBNF grammar (root rule "root") whose language is JSON texts valid under `schema`."""
    if not isinstance(schema, Mapping):
        raise UnsupportedSchemaError("the schema must be a JSON object")
    # The key is the compact JSON text (key order kept: it is the order the properties are generated in).
    return _compiled(json.dumps(schema, separators=(",", ":")))


@lru_cache(maxsize=256)
def _compiled(canonical: str) -> str:
    schema = json.loads(canonical)
    _check_node(schema, "schema")
    # llama-cpp-python's converter is untyped, hence the ignores.
    converter = SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        resolved = converter.resolve_refs(schema, "input")
        converter.visit(resolved, "")  # type: ignore[no-untyped-call]
    except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
        raise UnsupportedSchemaError(f"the schema cannot be converted to a grammar: {exc}") from exc
    # A sampled raw newline inside a string would make the answer unparseable: see _narrowed_chars.
    return _narrowed_chars(str(converter.format_grammar()))  # type: ignore[no-untyped-call]


def cache_info() -> Any:
    """The compilation cache's hits and misses (functools' CacheInfo)."""
    return _compiled.cache_info()


def _check_node(node: Any, where: str) -> None:
    if isinstance(node, bool) or not isinstance(node, dict):
        raise UnsupportedSchemaError(f"{where}: a schema must be a JSON object (boolean schemas are not supported)")
    unknown = sorted(key for key in node if key not in _ANNOTATIONS and key not in _CONSTRAINTS)
    if unknown:
        raise UnsupportedSchemaError(f"{where}: unsupported JSON Schema keyword(s) {', '.join(unknown)}")
    _check_shapes(node, where)
    constraints = {key for key in node if key in _CONSTRAINTS}
    # The converter reads the first of these it finds and ignores every sibling constraint.
    for exclusive in ("$ref", "anyOf"):
        if exclusive in node and constraints - {exclusive}:
            others = ", ".join(sorted(constraints - {exclusive}))
            raise UnsupportedSchemaError(f"{where}: {exclusive} combined with {others} is not supported")
    ref = node.get("$ref")
    if ref is not None and (not isinstance(ref, str) or not ref.startswith("#")):
        raise UnsupportedSchemaError(f"{where}: $ref {ref!r} is not a local reference (remote schemas are not fetched)")
    schema_type = node.get("type")
    if isinstance(schema_type, list):
        if not schema_type or any(t not in _TYPES for t in schema_type):
            raise UnsupportedSchemaError(f"{where}: unknown type in {schema_type}")
        if constraints - {"type"}:
            raise UnsupportedSchemaError(f"{where}: a list of types combined with other keywords is not supported")
    elif schema_type is not None and schema_type not in _TYPES:
        raise UnsupportedSchemaError(f"{where}: unknown type {schema_type!r}")
    if "format" in node and node["format"] not in _FORMATS:
        raise UnsupportedSchemaError(f"{where}: format {node['format']!r} is not supported")
    string_rules = [key for key in ("format", "minLength") if key in node]
    if "maxLength" in node and "minLength" not in node:
        string_rules.append("maxLength")
    if len(string_rules) > 1:
        raise UnsupportedSchemaError(f"{where}: {' with '.join(string_rules)} together is not supported")
    if ("minLength" in node or "maxLength" in node) and schema_type != "string":
        raise UnsupportedSchemaError(f"{where}: minLength/maxLength need type string")
    if ("minItems" in node or "maxItems" in node) and "items" not in node:
        raise UnsupportedSchemaError(f"{where}: minItems/maxItems need items")
    if "items" in node and (not isinstance(node["items"], dict) or not node["items"]):
        raise UnsupportedSchemaError(f"{where}: items must be a non-empty schema object")
    if ("enum" in node or "const" in node) and constraints - {"enum", "const", "type"}:
        raise UnsupportedSchemaError(f"{where}: enum/const combined with other constraints is not supported")
    properties = node.get("properties", {})
    if not isinstance(properties, dict):
        raise UnsupportedSchemaError(f"{where}: properties must be an object")
    missing = sorted(set(node.get("required", [])) - set(properties))
    if missing:
        raise UnsupportedSchemaError(f"{where}: required names properties it does not define: {', '.join(missing)}")
    for name, sub in properties.items():
        _check_node(sub, f"{where}.properties.{name}")
    additional = node.get("additionalProperties")
    if isinstance(additional, dict):
        _check_node(additional, f"{where}.additionalProperties")
    if "items" in node:
        _check_node(node["items"], f"{where}.items")
    for index, sub in enumerate(node.get("anyOf", [])):
        _check_node(sub, f"{where}.anyOf[{index}]")
    for container in ("$defs", "definitions"):
        for name, sub in node.get(container, {}).items():
            _check_node(sub, f"{where}.{container}.{name}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# What each keyword's value must be, so that a malformed schema is refused by name rather than tripping the
# checks or the converter (a request's schema is untrusted input).
_SHAPES: dict[str, tuple[str, Any]] = {
    "type": ("a type name or a list of them", lambda v: isinstance(v, str | list)),
    "properties": ("an object", lambda v: isinstance(v, dict)),
    "$defs": ("an object", lambda v: isinstance(v, dict)),
    "definitions": ("an object", lambda v: isinstance(v, dict)),
    "required": ("a list of property names", lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v)),
    "additionalProperties": ("a boolean or a schema", lambda v: isinstance(v, bool | dict)),
    "items": ("a schema object", lambda v: isinstance(v, dict)),
    "enum": ("a non-empty list", lambda v: isinstance(v, list) and bool(v)),
    "anyOf": ("a non-empty list of schemas", lambda v: isinstance(v, list) and bool(v)),
    "format": ("a string", lambda v: isinstance(v, str)),
    "minItems": ("a non-negative integer", _is_count),
    "maxItems": ("a non-negative integer", _is_count),
    "minLength": ("a non-negative integer", _is_count),
    "maxLength": ("a non-negative integer", _is_count),
}


def _check_shapes(node: dict[str, Any], where: str) -> None:
    for key, (expected, fits) in _SHAPES.items():
        if key in node and not fits(node[key]):
            raise UnsupportedSchemaError(f"{where}: {key} must be {expected}")
    schema_type = node.get("type")
    if isinstance(schema_type, list) and not all(isinstance(name, str) for name in schema_type):
        raise UnsupportedSchemaError(f"{where}: type must be a type name or a list of them")


# A reasoning block a tool-call grammar lets the model write before its calls: "open" when the prompt
# already opened <think> (Qwen3 thinking templates), "optional" when the model may open one itself. Its text
# may hold "<" but not "</" (so it cannot run past </think>).
_THINK_TEXT = 'think-text ::= ( [^<] | "<" [^/] )*'
_THINK_PREFIXES = {
    "open": 'think ::= think-text "</think>" [ \\t\\n]{0,4}',
    "optional": 'think ::= ( "<think>" think-text "</think>" [ \\t\\n]{0,4} )?',
}


def tool_call_grammar(
    tools: Sequence[tuple[str, Mapping[str, Any] | None]],
    *,
    open_tag: str,
    close_tag: str,
    parallel: bool,
    reasoning: str = "",
) -> str:
    """The GBNF grammar of one tool call, or of several separated by newlines when `parallel`:
    `{open_tag}\\n{"name": NAME, "arguments": ARGS}\\n{close_tag}`, NAME one of the tools' names and ARGS valid
    under that tool's parameters schema (None: any object). `reasoning` ("", "open", "optional") allows a
    <think> block first. A schema the converter cannot enforce raises UnsupportedSchemaError naming
    `tools[i].function.parameters`. Cached like schema_grammar."""
    key = json.dumps([[name, params] for name, params in tools], separators=(",", ":"))
    return _compiled_tool_calls(key, open_tag, close_tag, parallel, reasoning)


@lru_cache(maxsize=128)
def _compiled_tool_calls(key: str, open_tag: str, close_tag: str, parallel: bool, reasoning: str) -> str:
    converter = SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={"name": 0, "arguments": 1}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    alternatives = []
    for index, (name, params) in enumerate(json.loads(key)):
        where = f"tools[{index}].function.parameters"
        arguments = {"type": "object"} if params is None else params
        _check_node(arguments, where)
        try:
            # Each tool's $refs resolve inside its own parameters (a distinct base URL per tool).
            resolved = converter.resolve_refs(arguments, f"tool{index}")
            call = {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": resolved},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            alternatives.append(converter.visit(call, f"tool-{index}"))  # type: ignore[no-untyped-call]
        except (ValueError, AssertionError, KeyError, TypeError, RecursionError) as exc:
            raise UnsupportedSchemaError(f"{where}: the schema cannot be converted to a grammar: {exc}") from exc
    lines = [_narrowed_chars(str(converter.format_grammar()))]  # type: ignore[no-untyped-call]
    literal = json.dumps  # a GBNF string literal is written like a JSON string
    opening, closing = literal(open_tag + "\n"), literal("\n" + close_tag)
    lines.append(f"tool-call ::= {opening} ( {' | '.join(alternatives)} ) {closing}")
    calls = 'tool-call ( "\\n" tool-call )*' if parallel else "tool-call"
    if reasoning:
        lines += [_THINK_TEXT, _THINK_PREFIXES[reasoning], f"root ::= think {calls}"]
    else:
        lines.append(f"root ::= {calls}")
    return "\n".join(lines)


def _narrowed_chars(grammar: str) -> str:
    """The converter's string character admits raw control characters (U+0000..U+001F), which JSON forbids
    inside strings: narrow it as llama.cpp's converter does."""
    return grammar.replace('char ::= [^"\\\\] |', 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |')
