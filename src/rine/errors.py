"""The error types every layer shares (base layer: imports nothing of rine).

`RineError` is the base of rine's own errors, so that a caller can tell them from bugs. A
library message names parameters as the library spells them (`backbone=...`); a front end
(the CLI's flags, an HTTP API's fields) renders an `OptionError` in its own words with
`OptionError.render`, so that one message serves both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class RineError(Exception):
    """Base of rine's errors: `str()` is a message for a person, naming what to change."""


class UnknownNameError(RineError, KeyError):
    """A lookup of a name rine does not know (a model, a suite, a backbone, a precision...).

    A `LookupError` (a `KeyError`, for the callers that caught one), whose `str()` is the
    plain message, without the quotes `KeyError` adds."""

    def __init__(self, kind: str, name: str, known: Iterable[str] = (), hint: str = "", message: str | None = None):
        self.kind, self.name, self.known = kind, name, list(known)
        text = f"unknown {kind} {name!r}"
        if self.known:
            text += f"; known: {', '.join(self.known)}"
        super().__init__(message or text + (f" ({hint})" if hint else ""))

    def __str__(self) -> str:
        return str(self.args[0])


class OptionError(RineError, ValueError):
    """Options that do not fit together or cannot be used here.

    `template` mentions parameters as `{name}`; `values` gives the value a mention shows.
    `str()` renders them as the library's keywords (`device=cuda:3`), `render(flag)` as a
    front end spells them (the CLI: `--device cuda:3`)."""

    def __init__(self, template: str, **values: Any):
        self.template, self.values = template, values
        super().__init__(self.render())

    def render(self, spell: Callable[[str], str] | None = None) -> str:
        """The message with each `{name}` as `spell(name)` (+ " value" when one is given, in
        `values` or as `{name=value}` in the template); by default the keyword form
        `name=value` (or `name=` without a value)."""
        parts = {}
        for field in _fields(self.template):
            name, _, literal = field.partition("=")
            value = literal or self.values.get(name)
            if spell is None:
                parts[field] = f"{name}={value if value is not None else ''}"
            else:
                parts[field] = spell(name) + (f" {value}" if value is not None else "")
        return self.template.format_map(parts)

    def __str__(self) -> str:
        return self.render()


def literal(text: object) -> str:
    """`text` (a path, a user's value) made safe to put inside an `OptionError` template."""
    return str(text).replace("{", "{{").replace("}", "}}")


def _fields(template: str) -> set[str]:
    import string

    return {field for _, field, _, _ in string.Formatter().parse(template) if field}


def message_of(error: BaseException) -> str:
    """The text of an exception; a plain KeyError's message without the quotes str() adds."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        return error.args[0]
    return str(error)
