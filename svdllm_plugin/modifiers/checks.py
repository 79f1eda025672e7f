"""Field types the plugin's modifiers share: pydantic ``Annotated`` types whose messages name the field."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BeforeValidator, ValidationInfo

__all__ = ["Modules", "PositiveInt", "as_list"]


def as_list(value):
    """A single string becomes a one-element list (``targets: Linear``)."""
    return [value] if isinstance(value, str) else value


def _positive_int(value: int, info: ValidationInfo) -> int:
    if value < 1:
        raise ValueError(f"`{info.field_name}` must be a positive integer; got {value}")
    return value


Modules = Annotated[list[str], BeforeValidator(as_list)]  # module patterns: one, or a list
PositiveInt = Annotated[int, AfterValidator(_positive_int)]
