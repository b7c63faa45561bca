"""The checks on what a user passes, shared by the CLI flags and the Python API (`Model.generate`): the same ranges
and the same messages, each naming the parameter. A check returns the value or raises ValueError; `flag(check)`
turns one into an argparse type (the text parsed first, the error reported against the flag). Every numeric flag of
every subcommand takes one of the types at the end of this file, so a bad value is refused at parse time, before
anything loads."""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Callable
from typing import Any

SEED_LIMIT = 2**32  # PRNG seeds are uint32


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def integer(name: str, value: Any, low: int, high: int | None = None) -> int:
    """An integer >= low (and < high when given)."""
    if not is_int(value) or value < low or (high is not None and value >= high):
        rule = f">= {low}" if high is None else f"in [{low}, {_power(high)})"
        raise ValueError(f"{name} must be an integer {rule}, got {value!r}".lstrip())
    return int(value)


def number(name: str, value: Any, low: float | None = None, high: float | None = None,
           open_low: bool = False) -> float:
    """A finite number, >= low (> low when open_low) and <= high where given."""
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (low is None or (value > low if open_low else value >= low)) and (high is None or value <= high)
    if not ok:
        if low is not None and high is not None:
            rule = f"in {'(' if open_low else '['}{low:g}, {high:g}]"
        elif low is not None:
            rule = f"{'>' if open_low else '>='} {low:g}"
        else:
            rule = "finite"
        rule = "" if rule == "finite" else f" {rule}"
        raise ValueError(f"{name} must be a finite number{rule}, got {value!r}".lstrip())
    return float(value)


def _power(n: int) -> str:
    return "2^32" if n == SEED_LIMIT else str(n)


# the parameters of Model.generate and the generate/eval flags ------------------------------------------------

def max_new_tokens(value: Any) -> int:
    return integer("max_new_tokens", value, 1)


def temperature(value: Any) -> float:
    return number("temperature", value, low=0.0)


def top_p(value: Any) -> float:
    return number("top_p", value, low=0.0, high=1.0, open_low=True)


def top_k(value: Any) -> int:
    return integer("top_k", value, 0)


def seed(value: Any) -> int:
    return integer("seed", value, 0, SEED_LIMIT)


def check_writable(directory: Any, what: str, remedy: str, *, create: bool = False) -> None:
    """Refuse, before the work whose output goes there, a folder `what` cannot be written into (`create`: make it
    first): ValueError 'cannot write {what} into {directory} ({reason}): {remedy}'."""
    import tempfile
    from pathlib import Path

    directory = Path(directory)
    try:
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".raas-jax-write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"cannot write {what} into {directory} ({e.strerror or e}): {remedy}") from None


def sampling(temperature_: Any, top_p_: Any, top_k_: Any, seed_: Any) -> tuple[float, float, int, int]:
    return temperature(temperature_), top_p(top_p_), top_k(top_k_), seed(seed_)


def flag(check: Callable[[Any], Any], kind: type = int) -> Callable[[str], Any]:
    """argparse type from a check: parse the text as `kind`, then check it (refused at parse time)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        try:
            return check(value)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


# argparse types of the other numeric flags ------------------------------------------------------------------

def at_least(low: int) -> Callable[[str], int]:
    """An integer >= `low`."""
    return flag(lambda value: integer("", value, low))


def finite(low: float | None = None) -> Callable[[str], float]:
    """A finite number (>= `low` when given)."""
    return flag(lambda value: number("", value, low=low), float)


def fraction(text: str) -> float:
    """A share in (0, 1], e.g. --memory-fraction 0.92."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], e.g. 0.92; got {text!r}")
    return value


def rows(text: str) -> int | str:
    """--max-rows: an integer >= 1 or "auto"."""
    return "auto" if text == "auto" else at_least(1)(text)


def int_list(low: int) -> Callable[[str], tuple[int, ...]]:
    """Comma-separated integers, each >= `low`: "1,16,64" -> (1, 16, 64)."""
    def parse(text: str) -> tuple[int, ...]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 1,16,64; got {text!r}")
        return tuple(at_least(low)(item) for item in items)
    return parse
