"""`ConfigError` and the field checks every config section's owner uses.

A leaf: it imports nothing from jaxcond, so any module may validate its own fields
with it. Every error names the field as it is overridden on the command line
(`config.dropout.groups.caption.rate`) and says what would be accepted.
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A config field (or flag) has a value jaxcond cannot run with."""


def check(ok: bool, field: str, value: object, want: str) -> None:
    """Raises ConfigError naming `config.<field> = <value>` and `want` unless `ok`."""
    if not ok:
        raise ConfigError(f"config.{field} = {value!r}: {want}")


def one_of(field: str, value: object, options: Iterable[str]) -> None:
    options = tuple(options)
    check(value in options, field, value, f"must be one of {options}")


def int_at_least(field: str, value: object, low: int) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and value >= low,
          field, value, f"must be an integer >= {low}")


def in_unit_interval(field: str, value: object) -> None:
    check(isinstance(value, (int, float)) and 0.0 <= value <= 1.0, field, value,
          "must be a number in [0, 1]")
