"""The Pydantic models the client suites ask for, and the served model's id.

Every string and list is bounded (maxLength, maxItems) so that even at temperature 1.0 SmolLM2-135M's
constrained answer ends well within max_tokens: a cut answer would be max_tokens' fault, not the grammar's.
The shapes cover what clients generate from Pydantic: flat fields, nested models ($defs/$ref), enums,
Literals, lists of scalars and of objects, and optional fields (anyOf with null)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Literal

from pydantic import BaseModel, Field

MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 300


class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population: int
    coastal: bool


class Mood(StrEnum):
    HAPPY = "happy"
    SAD = "sad"
    CALM = "calm"


class Person(BaseModel):
    """Enums, a Literal, a bounded list of strings and an optional field."""

    name: str = Field(max_length=16)
    age: int
    mood: Mood
    hand: Literal["left", "right"]
    pets: list[Annotated[str, Field(max_length=8)]] = Field(max_length=3)
    nickname: str | None = Field(default=None, max_length=8)


class Address(BaseModel):
    street: str = Field(max_length=20)
    city: str = Field(max_length=16)
    zip_code: str = Field(max_length=8)


class Contact(BaseModel):
    """Nested objects: one directly, a bounded list of them, and an optional one."""

    name: str = Field(max_length=16)
    home: Address
    offices: list[Address] = Field(max_length=2)
    backup: Address | None = None
    height_m: float


SHAPES: list[type[BaseModel]] = [City, Person, Contact]

PROMPTS: dict[type[BaseModel], str] = {
    City: "Tell me about Paris as JSON.",
    Person: "Describe a made-up person as JSON.",
    Contact: "Make up a contact card with addresses as JSON.",
}
