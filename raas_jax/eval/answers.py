"""Final-answer extraction and math-answer equivalence for GSM8K / MATH500 / AIME24 style evaluation.

`extract_answer(text)` pulls the final answer out of a model completion or a gold solution
(last ``\\boxed{...}``, else GSM8K's ``#### N``, else "The answer is X" / "Answer: X").

`is_equivalent(predicted, gold)` decides whether two answers denote the same thing with Hugging Face's
math-verify (``parse`` + ``verify``: LaTeX to sympy, numbers, sets, intervals, tuples, matrices,
equations, text answers), after two rules of ours (docs/design.md, "Implementation decisions"):

* trailing unit words after a number are dropped (``18 dollars`` = ``18``);
* a column vector is the tuple of its entries (``\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}`` = ``(1, 2)``).

A rounded decimal is not an exact answer (``0.3333`` != ``\\frac{1}{3}``). Plain numbers (``2,125``,
``-10``, ``18.90``) are compared exactly without math-verify. Nothing here raises on malformed input.
"""

from __future__ import annotations

import re
import signal
import threading
from fractions import Fraction

__all__ = ["extract_answer", "is_equivalent"]

TIME_LIMIT_S = 5  # math-verify's limit per parse / comparison (whole seconds: signal.alarm)

_UNIT_WORDS = (
    "cm", "centimeters?", "centimetres?", "mm", "millimeters?", "km", "kilometers?", "kilometres?",
    "m", "meters?", "metres?", "inch", "inches", "ft", "feet", "foot", "yd", "yards?", "miles?", "mph",
    "units?", "sq", "square", "cubic", "dollars?", "cents?", "hours?", "hrs?", "minutes?", "mins?",
    "seconds?", "secs?", "days?", "weeks?", "months?", "years?", "kg", "grams?", "g", "lbs?", "pounds?",
    "ounces?", "oz", "liters?", "litres?", "ml", "gallons?", "degrees?", "percent", "points?",
)
_TRAILING_UNIT_RE = re.compile(
    r"^(?P<rest>.*\S)\s+(?:" + "|".join(_UNIT_WORDS) + r")\.?\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$", re.I
)
_COLUMN_RE = re.compile(r"\\begin\{([pb]?matrix)\}((?:(?!&).)*)\\end\{\1\}", re.S)
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")
_TOO_EXPENSIVE_RE = re.compile(r"\^\s*\{[^{}]*\^|\d{4,}\s*!")  # power towers, huge factorials


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------

def _matching_brace(text: str, open_idx: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at `open_idx` (escaped ``\\{``/``\\}`` skipped), or None."""
    depth = 0
    i = open_idx
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def _boxed_contents(text: str) -> list[str]:
    """Contents of every complete ``\\boxed{...}``, ``\\boxed x`` and ``\\fbox{...}``, in order of appearance."""
    contents = []
    for match in re.finditer(r"\\(?:boxed|fbox)(?![a-zA-Z])", text):
        j = match.end()
        while j < len(text) and text[j] in " \t":
            j += 1
        if j < len(text) and text[j] == "{":
            end = _matching_brace(text, j)
            if end is not None:
                contents.append(text[j + 1:end])
        else:
            bare = re.match(r"[^\s$]+", text[j:])
            if bare:
                contents.append(bare.group(0))
    return contents


def _strip_delimiters(answer: str) -> str:
    """Strip surrounding whitespace, ``$`` and ``\\( \\)`` / ``\\[ \\]`` math delimiters."""
    answer = answer.strip().strip("$").strip()
    answer = re.sub(r"^\\[(\[]\s*|\s*\\[)\]]$", "", answer)
    return answer.strip().strip("$").strip()


def _clean_phrase(answer: str) -> str:
    """Clean a sentence-level answer: delimiters, markdown bold and a trailing period."""
    answer = _strip_delimiters(answer).strip("*").strip()
    return _strip_delimiters(answer.rstrip(".").rstrip())


def _sentence(text: str) -> str:
    """`text` up to the end of its first sentence (a period followed by space/end, outside ``$...$``)."""
    in_math = False
    for i, char in enumerate(text):
        if char == "$":
            in_math = not in_math
        elif char == "." and not in_math and (i + 1 == len(text) or text[i + 1].isspace()):
            return text[:i]
    return text


def _phrase_answer(text: str) -> str | None:
    """The X of the last "The (final) answer is X" / "Answer: X" in `text`, or None."""
    pattern = re.compile(r"(?:\bthe\s+(?:final\s+)?answer\s+is\b|\banswer\s*:)\s*:?[ \t]*", re.I)
    found = None
    for match in pattern.finditer(text):
        candidate = _clean_phrase(_sentence(text[match.end():].split("\n", 1)[0]))
        if candidate:
            found = candidate
    return found


def extract_answer(text: str) -> str | None:
    """Extract the final answer from a completion or gold solution.

    Priority: the last complete ``\\boxed{...}`` / ``\\boxed x`` / ``\\fbox{...}`` (nested braces
    handled); else the rest of the line after the last ``####`` (GSM8K gold format); else the last
    "The answer is X" / "The final answer is X" / "Answer: X" (X up to the end of the sentence).
    Returns the raw answer stripped of surrounding whitespace and ``$``, or None if nothing is found.
    """
    if not text:
        return None
    boxed = [b for b in (_strip_delimiters(c) for c in _boxed_contents(text)) if b]
    if boxed:
        return boxed[-1]
    if "####" in text:
        line = text.rsplit("####", 1)[1].lstrip(" \t").split("\n", 1)[0]
        line = _clean_phrase(line)
        if line:
            return line
    return _phrase_answer(text)


# ----------------------------------------------------------------------------------------------
# Equivalence (math-verify, after our two rules)
# ----------------------------------------------------------------------------------------------

def _prepare(answer: str) -> str:
    """Our rules before math-verify: delimiters and a final period off, trailing unit words after a number
    dropped, a column vector written as the tuple of its entries."""
    s = _strip_delimiters(answer).rstrip(".").strip()
    while (match := _TRAILING_UNIT_RE.match(s)) and re.search(r"(?:[\d})]|\\pi)$", match.group("rest")):
        s = match.group("rest").rstrip()
    column = _COLUMN_RE.fullmatch(s)
    if column:
        rows = [row.strip() for row in re.split(r"\\\\", column.group(2)) if row.strip()]
        if len(rows) >= 2:
            s = "(" + ", ".join(rows) + ")"
    return s


def _plain_number(s: str) -> Fraction | None:
    """An integer or decimal (optionally with thousands separators) as an exact Fraction, else None."""
    return Fraction(s.replace(",", "")) if _PLAIN_NUMBER_RE.fullmatch(s) else None


def _math_verify(predicted: str, gold: str) -> bool:
    from math_verify import parse, verify

    # Inputs whose evaluation no timer could interrupt (one huge integer power) are refused first. math-verify
    # times out with signal.alarm, which only the main thread may use (and which would cancel an outer timer):
    # elsewhere it runs without a limit.
    if _TOO_EXPENSIVE_RE.search(predicted) or _TOO_EXPENSIVE_RE.search(gold):
        return False
    limited = (threading.current_thread() is threading.main_thread() and hasattr(signal, "alarm")
               and signal.getitimer(signal.ITIMER_REAL)[0] == 0)
    limit = TIME_LIMIT_S if limited else None
    gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=limit)
    predicted_parsed = parse(f"\\boxed{{{predicted}}}", parsing_timeout=limit)
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(verify(gold_parsed, predicted_parsed, timeout_seconds=limit))


def is_equivalent(predicted: str | None, gold: str) -> bool:
    """Whether the predicted answer denotes the same value / object as the gold answer (see the module
    docstring for the rules). `predicted` is typically the output of `extract_answer`; None is never
    equivalent. Never raises: what math-verify cannot parse or compare is not equivalent (unless equal as
    prepared strings)."""
    if predicted is None or gold is None:
        return False
    try:
        a, b = _prepare(predicted), _prepare(gold)
    except Exception:  # noqa: BLE001 - a grader must not crash an evaluation run
        return predicted.strip() == gold.strip()
    if a == b:
        return True
    if not a or not b:
        return False
    num_a, num_b = _plain_number(a), _plain_number(b)
    if num_a is not None and num_b is not None:
        return num_a == num_b
    try:
        return _math_verify(a, b)
    except Exception:  # noqa: BLE001
        return False
