"""Invalid job specs: :class:`ConfigError`, and pydantic's errors turned into one line each,
field path first, with the allowed values (or a did-you-mean) and what was given."""

from __future__ import annotations

import difflib
import typing
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from elastic.config.fields import short_repr
from elastic.config.job import JobSpec


class ConfigError(ValueError):
    """An invalid job spec. ``str()`` is one line; ``errors`` holds every problem, one line each."""

    def __init__(self, errors: list[str] | str) -> None:
        self.errors: list[str] = [errors] if isinstance(errors, str) else list(errors)
        first = self.errors[0] if self.errors else "invalid job spec"
        more = len(self.errors) - 1
        suffix = f" (and {more} more error{'s' if more > 1 else ''}; `elastic validate` lists them all)" if more else ""
        super().__init__(first + suffix)


def _format_loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<job spec>"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model found at ``loc`` under JobSpec (list indices skipped), if any."""
    model: type[BaseModel] = JobSpec
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        inner = _find_model(field.annotation) if field is not None else None
        if inner is None:
            return None
        model = inner
    return model


def _find_model(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _find_model(arg)
        if found is not None:
            return found
    return None


_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _format_error(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    path = _format_loc(loc)
    if kind == "extra_forbidden":
        model = _model_at(loc[:-1])
        allowed = sorted(model.model_fields) if model is not None else []
        guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        if guess:
            return f"{path}: unknown key; did you mean {guess[0]!r}?"
        return f"{path}: unknown key; allowed keys: {', '.join(allowed)}"
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "elastic":
        return f"{path}: {ctx['message']}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        message = f"must be {_BOUNDS[kind]} {bound:g}" if isinstance(bound, (int, float)) else f"must be {_BOUNDS[kind]} {bound}"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        message = "must be a mapping of keys to values"
    elif kind in ("tuple_type", "list_type"):
        message = "must be a list"
    elif kind == "string_too_short":
        message = "must not be empty" if ctx.get("min_length") == 1 else f"must have at least {ctx.get('min_length')} characters"
    elif kind == "finite_number":
        message = "must be a finite number"
    else:
        message = str(error["msg"]).replace("Input should be", "must be")
    return f"{path}: {message} (got {short_repr(value)})"


def errors_of(exc: ValidationError) -> list[str]:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        line = " ".join(_format_error(error).split())  # one line whatever the input contained
        if line not in lines:
            lines.append(line)
    return lines
