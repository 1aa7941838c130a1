"""The metric names a PromQL expression reads, without a PromQL parser: drop what cannot be a metric name
(strings, label matchers, range and grouping clauses, numbers), then keep identifiers that are not functions,
keywords or aggregation operators."""

from __future__ import annotations

import re

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "by", "without", "on", "ignoring"}


def metric_names(expr: str) -> set[str]:
    """Series names `expr` selects, e.g. {"qwen3_local:e2e_request_latency_seconds_bucket"}."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("", text)
    text = _RANGE.sub("", text)
    text = _GROUPING.sub("", text)
    names = set()
    for name, call in _IDENTIFIER.findall(text):
        if call or name.lower() in _KEYWORDS:
            continue  # a function or aggregation (`rate(`, `sum(`), or an operator keyword
        names.add(name)
    return names
