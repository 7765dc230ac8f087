"""The names of the concept library and the references of a composition prompt, as the learner's contract writes
them (`ice.learner.v1.LibraryConcept`, `GenerateCompositionRequest.prompts`); the SDK and the services both
parse and write them here.

    operations/{job_id}/concepts/{concept_id}                      a concept (its concept token in a prompt)
    operations/{job_id}/concepts/{concept_id}/tokens/{attribute}   one of its intrinsic tokens

A composition prompt holds references in braces, "a photo of {operations/J/concepts/c0} in
{operations/K/concepts/c1/tokens/color} color", with "{{" and "}}" for literal braces. Only the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

JOB_ID = r"[0-9a-f]{32}"
CONCEPT_ID = r"[A-Za-z0-9_-]{1,64}"
_ATTRIBUTE = r"(?:[A-Za-z0-9._~-]|%[0-9A-Fa-f]{2})+"
_NAME = re.compile(rf"^operations/({JOB_ID})/concepts/({CONCEPT_ID})(?:/tokens/({_ATTRIBUTE}))?$")


class BadName(ValueError):
    """A malformed concept or token name, or a malformed composition prompt."""


@dataclass(frozen=True, order=True)
class Ref:
    """A concept (`attribute` None: its concept token) or one of its intrinsic tokens."""

    job_id: str
    concept_id: str
    attribute: str | None = None

    @property
    def concept_name(self) -> str:
        return f"operations/{self.job_id}/concepts/{self.concept_id}"

    @property
    def name(self) -> str:
        if self.attribute is None:
            return self.concept_name
        return token_name(self.job_id, self.concept_id, self.attribute)


def token_name(job_id: str, concept_id: str, attribute: str) -> str:
    return f"operations/{job_id}/concepts/{concept_id}/tokens/{quote(attribute, safe='')}"


def parse_name(name: str) -> Ref:
    """A concept's or token's resource name; `BadName` saying what is expected otherwise."""
    m = _NAME.match(name)
    if m is None or (m.group(3) is not None and not unquote(m.group(3))):
        raise BadName(f"expected 'operations/{{job_id}}/concepts/{{concept_id}}' or "
                         f"'.../tokens/{{attribute}}' (job_id: 32 hexadecimal digits), got {name!r}")
    return Ref(m.group(1), m.group(2), unquote(m.group(3)) if m.group(3) is not None else None)


def parse_prompt(prompt: str, reference: Callable[[str], Any] = parse_name) -> list:
    """The prompt as text pieces and references, in order; "{{" / "}}" are literal braces. `reference` reads the
    inside of a pair of braces (the SDK's own reads its readable syntax too)."""
    parts: list = []
    text, i = [], 0
    while i < len(prompt):
        ch = prompt[i]
        if ch in "{}" and prompt[i + 1 : i + 2] == ch:
            text.append(ch)
            i += 2
        elif ch == "}":
            raise BadName(f"a '}}' at {i} closes no reference (write '}}}}' for a literal brace)")
        elif ch == "{":
            end = prompt.find("}", i + 1)
            if end < 0:
                raise BadName(f"the '{{' at {i} is never closed (write '{{{{' for a literal brace)")
            if text:
                parts.append("".join(text))
                text = []
            parts.append(reference(prompt[i + 1 : end].strip()))
            i = end + 1
        else:
            text.append(ch)
            i += 1
    if text:
        parts.append("".join(text))
    return parts


def references(parts: list[str | Ref]) -> list[Ref]:
    """The distinct references of a parsed prompt, in order of first appearance."""
    return list(dict.fromkeys(p for p in parts if isinstance(p, Ref)))


def format_prompt(parts: list[str | Ref]) -> str:
    """The wire form of a parsed prompt (the inverse of `parse_prompt`)."""
    return "".join("{" + p.name + "}" if isinstance(p, Ref) else p.replace("{", "{{").replace("}", "}}")
                   for p in parts)
