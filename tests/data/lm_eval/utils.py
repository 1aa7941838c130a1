"""Loads the tiny lm-eval tasks' data from the JSON-lines files beside this module (no hub, no download)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets

HERE = Path(__file__).parent


def _docs(name: str) -> datasets.DatasetDict:
    rows = [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def multiple_choice_docs(**_: Any) -> datasets.DatasetDict:
    return _docs("mc.jsonl")


def generation_docs(**_: Any) -> datasets.DatasetDict:
    return _docs("gen.jsonl")
