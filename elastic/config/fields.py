"""Building blocks of the job-spec sections: strict field types, one-line errors, the section base.

Every section model derives from :class:`Section` (frozen, unknown keys refused, each field's meaning
in the docstring under it) and reports its cross-field problems through :class:`Problems`, all at
once, so that ``elastic validate`` lists every one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Strict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


def field_error(message: str) -> PydanticCustomError:
    """An error whose message is used verbatim (it already says what was given)."""
    return PydanticCustomError("elastic", "{message}", {"message": message})


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_bool(value: Any) -> Any:
    # YAML `true` would otherwise pass as 1 / 1.0; a bool where a number belongs is always a typo.
    if isinstance(value, bool):
        raise field_error(f"must be a number, not a boolean (got {value})")
    return value


def two_numbers(value: Any) -> Any:
    if value is not None and (not isinstance(value, (list, tuple)) or len(value) != 2):
        raise field_error(f"must be a list of two numbers [beta1, beta2] (got {short_repr(value)})")
    return value


Int = Annotated[int, Strict()]
"""A whole number; refuses strings, floats and booleans."""
Float = Annotated[float, BeforeValidator(_reject_bool)]
"""A finite number; ints are accepted, and numeric strings such as YAML 1.1's ``1e-3``."""
Bool = Annotated[bool, Strict()]


def _auto_or_positive_int(value: Any) -> Any:
    if value == "auto" and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise field_error(f"must be 'auto' or an int >= 1 (got {short_repr(value)})")
    return value


AutoOrInt = Annotated[Union[Literal["auto"], int], BeforeValidator(_auto_or_positive_int)]
"""``"auto"`` or a whole number >= 1."""


def _auto_or_natural_int(value: Any) -> Any:
    if value == "auto" and isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise field_error(f"must be 'auto' or an int >= 0 (got {short_repr(value)})")
    return value


AutoOrZeroInt = Annotated[Union[Literal["auto"], int], BeforeValidator(_auto_or_natural_int)]
"""``"auto"`` or a whole number >= 0."""


class Problems:
    """Cross-field problems of one model, raised together so that validate lists them all."""

    def __init__(self, title: str) -> None:
        self._title = title
        self._details: list[InitErrorDetails] = []

    def add(self, loc: tuple[str | int, ...], message: str, value: Any = None) -> None:
        self._details.append(InitErrorDetails(type=field_error(message), loc=loc, input=value))

    def raise_if_any(self) -> None:
        if self._details:
            raise ValidationError.from_exception_data(self._title, self._details)


class Section(BaseModel):
    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        allow_inf_nan=False,
        use_attribute_docstrings=True,
    )
