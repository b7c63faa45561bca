"""Final-answer extraction and math-answer equivalence for GSM8K / MATH500 / AIME24 style evaluation.

`extract_answer(text)` pulls the final answer out of a model completion or a gold solution
(last ``\\boxed{...}``, else GSM8K's ``#### N``, else "The answer is X" / "Answer: X").

`is_equivalent(predicted, gold)` decides whether two answers denote the same thing.  Both sides are
normalised (LaTeX spacing, ``\\left``/``\\right``, ``\\dfrac``, ``\\frac12`` shorthand, ``\\text{}``
wrappers, units, degrees, percent, thousands separators, a leading ``x =`` ...), then compared as

* strings (case-insensitively for text answers such as ``\\text{(C)}`` or ``Monday``);
* numbers (exact for integers / fractions, relative tolerance 1e-4 when a decimal is involved);
* structures: tuples, intervals, sets, comma lists, unions, ``\\pm`` pairs and matrices,
  element by element (recursively);
* equations, by their right-hand sides when the left-hand sides match, else up to a constant factor;
* sympy expressions, converted from LaTeX by this module (no ``sympy.parsing.latex``), compared by
  numeric evaluation at random points and, if that is inconclusive, by a time-limited ``simplify``.

Nothing here raises on malformed input: anything that cannot be parsed falls back to string equality.
"""

from __future__ import annotations

import contextlib
import random
import re
import signal
import threading
import warnings
from collections.abc import Callable, Iterator
from fractions import Fraction
from types import MappingProxyType
from typing import TypeVar

import sympy
from sympy.parsing.sympy_parser import (
    function_exponentiation,
    implicit_application,
    implicit_multiplication,
    parse_expr,
    standard_transformations,
)

__all__ = ["extract_answer", "is_equivalent"]

T = TypeVar("T")

SYMPY_TIME_LIMIT_S = 2.0
CHEAP_TIME_LIMIT_S = 1.0
NUMERIC_REL_TOL = 1e-4
NUMERIC_ABS_TOL = 1e-8
MAX_RECURSION = 6

_TRANSFORMS = standard_transformations + (implicit_multiplication, implicit_application, function_exponentiation)

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
_TEXT_COMMANDS = ("text", "textbf", "textit", "textrm", "textsf", "texttt", "textnormal", "mbox",
                  "mathrm", "mathbf", "mathit", "mathsf", "mathtt", "boldsymbol", "operatorname")
_SPACING_RE = re.compile(r"(?<!\\)\\(?:[!,;: ]|quad(?![a-zA-Z])|qquad(?![a-zA-Z])|displaystyle(?![a-zA-Z])|"
                         r"textstyle(?![a-zA-Z])|limits(?![a-zA-Z]))|~")
_ASSIGNMENT_RE = re.compile(
    r"^(?:[a-zA-Z]|\\(?:alpha|beta|gamma|delta|theta|lambda|mu|phi|psi|omega|rho|sigma|tau))"
    r"(?:_\{?[a-zA-Z0-9]+\}?)?(?:\([a-zA-Z]\))?\s*(?:=|\\in(?![a-zA-Z]))\s*(?P<rhs>[^=]+)$"
)
_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_GREEK = frozenset({"alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta",
                    "vartheta", "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau",
                    "upsilon", "phi", "varphi", "chi", "psi", "omega", "Gamma", "Delta", "Theta",
                    "Lambda", "Xi", "Sigma", "Phi", "Psi", "Omega"})
_FUNCTIONS = MappingProxyType({
    "sin": "sin", "cos": "cos", "tan": "tan", "cot": "cot", "sec": "sec", "csc": "csc", "arcsin": "asin",
    "arccos": "acos", "arctan": "atan", "sinh": "sinh", "cosh": "cosh", "tanh": "tanh", "ln": "log",
    "log": "log", "exp": "exp",
})


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
# Normalisation
# ----------------------------------------------------------------------------------------------

def _read_arg(s: str, i: int) -> tuple[str, int] | None:
    """Read one TeX macro argument at `s[i]` (spaces skipped): ``{group}``, ``\\command`` or one char."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return None
    if s[i] == "{":
        end = _matching_brace(s, i)
        return None if end is None else (s[i + 1:end], end + 1)
    if s[i] == "\\":
        command = re.match(r"\\(?:[a-zA-Z]+|.)", s[i:])
        return (command.group(0), i + len(command.group(0))) if command else None
    if s[i] in "}^_":
        return None
    return s[i], i + 1


def _unwrap_commands(s: str, names: tuple[str, ...]) -> str:
    """Replace every ``\\name{content}`` (for name in `names`) by `` content `` (balanced braces)."""
    pattern = re.compile(r"\\(?:" + "|".join(names) + r")(?![a-zA-Z])\s*")
    while True:
        match = pattern.search(s)
        if not match:
            return s
        arg = _read_arg(s, match.end())
        if arg is None:
            return s[:match.start()] + s[match.end():]
        content, end = arg
        s = s[:match.start()] + " " + content + " " + s[end:]


def _brace_shorthand(s: str) -> str:
    """Rewrite ``\\frac12``, ``\\frac1{2}``, ``\\sqrt2``, ``\\sqrt[3]x`` into fully braced form."""
    out = []
    i = 0
    while i < len(s):
        match = re.match(r"\\(frac|sqrt)(?![a-zA-Z])", s[i:])
        if not match:
            step = 2 if s[i] == "\\" and i + 1 < len(s) and not s[i + 1].isalpha() else 1
            out.append(s[i:i + step])
            i += step
            continue
        j = i + len(match.group(0))
        if match.group(1) == "sqrt":
            index = ""
            if j < len(s) and s[j] == "[" and "]" in s[j:]:
                close = s.index("]", j)
                index = "[" + _brace_shorthand(s[j + 1:close]) + "]"
                j = close + 1
            arg = _read_arg(s, j)
            if arg is None:
                out.append(s[i:])
                break
            out.append(f"\\sqrt{index}{{{_brace_shorthand(arg[0])}}}")
            i = arg[1]
        else:
            num = _read_arg(s, j)
            den = _read_arg(s, num[1]) if num else None
            if num is None or den is None:
                out.append(s[i:])
                break
            out.append(f"\\frac{{{_brace_shorthand(num[0])}}}{{{_brace_shorthand(den[0])}}}")
            i = den[1]
    return "".join(out)


def _remove_spaces(s: str) -> str:
    """Drop all whitespace except one space between a ``\\command`` and a following letter."""
    s = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\x00", s)
    return re.sub(r"\s+", "", s).replace("\x00", " ")


def _strip_units(s: str) -> str:
    """Repeatedly drop trailing unit words (``cm``, ``inches^2``, ``dollars``...) that follow a number."""
    while True:
        match = _TRAILING_UNIT_RE.match(s)
        if not match or not re.search(r"(?:[\d})]|\\pi)$", match.group("rest")):
            return s
        s = match.group("rest").rstrip()


def _normalize(answer: str) -> str:
    """Canonical string form of an answer (see the module docstring for the rules)."""
    s = answer.strip()
    s = s.replace("\\$", " ").replace("$", " ")
    s = re.sub(r"(?<!\\)\\[()\[\]]", " ", s)
    s = re.sub(r"\\(?:left|right)\s*\.", " ", s)
    s = re.sub(r"\\(?:left|right|[bB]igg?[lr]?)(?![a-zA-Z])", "", s)
    s = _SPACING_RE.sub(" ", s)
    s = re.sub(r"\\[dtc]frac(?![a-zA-Z])", r"\\frac", s)
    s = _unwrap_commands(s, _TEXT_COMMANDS)
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\circ(?![a-zA-Z])|\\degree(?![a-zA-Z])|°", " ", s)
    s = re.sub(r"\\?%", " ", s)
    s = re.sub(r"\s+", " ", s).strip().rstrip(".").strip()
    s = _strip_units(s)
    assignment = _ASSIGNMENT_RE.match(s)
    if assignment:
        s = assignment.group("rhs").strip()
    s = _remove_spaces(s)
    s = _brace_shorthand(s)
    s = re.sub(r"_\{([a-zA-Z0-9])\}", r"_\1", s)
    s = re.sub(r"(?<=\d)_\{(\d+)\}", r"_\1", s)
    if re.fullmatch(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):
        s = s.replace(",", "")
    s = re.sub(r"\\infinity|∞", r"\\infty", s)
    s = re.sub(r"(?<![\w)}])\+(?=\\infty|\d)", "", s)
    s = re.sub(rf"^\(([A-Za-z]|{_NUM})\)$", r"\1", s)
    return s.rstrip(".")


# ----------------------------------------------------------------------------------------------
# Structures: top-level splitting, collections, matrices
# ----------------------------------------------------------------------------------------------

def _split_top(s: str, sep: str) -> list[str]:
    """Split `s` on `sep` where it occurs outside any (), [], {} nesting (``\\{``/``\\}`` count as
    brackets); a command separator such as ``\\pm`` does not match a longer command (``\\pmod``)."""
    is_command = sep.startswith("\\") and sep[-1].isalpha()
    parts, depth, start, i = [], 0, 0, 0
    while i < len(s):
        if depth == 0 and s.startswith(sep, i):
            following = s[i + len(sep):i + len(sep) + 1]
            if not (is_command and following.isalpha()):
                parts.append(s[start:i])
                i += len(sep)
                start = i
                continue
        char = s[i]
        if char == "\\" and i + 1 < len(s) and not s[i + 1].isalpha():
            depth += {"{": 1, "}": -1}.get(s[i + 1], 0)
            i += 2
            continue
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        i += 1
    parts.append(s[start:])
    return parts


def _closes_at_end(s: str) -> bool:
    """True if the bracket opening `s` is closed by the last character of `s` (any bracket kinds)."""
    depth = 0
    for i, char in enumerate(s):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return i == len(s) - 1
    return False


def _expand_pm(item: str) -> list[str]:
    """``a\\pm b`` -> [``a+b``, ``a-b``] (one top-level ``\\pm``); anything else -> [item]."""
    parts = _split_top(item, "\\pm")
    if len(parts) != 2:
        return [item]
    head, tail = parts
    return [f"{head}+{tail}", f"{head}-{tail}"]


def _as_collection(s: str) -> tuple[str, list[str]] | None:
    """Classify `s` as (kind, items): ``union``, ``set`` (unordered: ``\\{..\\}``, bare lists, ``\\pm``)
    or an ordered bracketed tuple/interval whose kind is its bracket pair; None for a single expression."""
    union = _split_top(s, "\\cup")
    if len(union) >= 2:
        return "union", union
    if s.startswith("\\{") and s.endswith("\\}"):
        inner = s[2:-2]
        return "set", [] if not inner else [x for item in _split_top(inner, ",") for x in _expand_pm(item)]
    if s and s[0] in "([" and s[-1] in ")]" and _closes_at_end(s):
        items = _split_top(s[1:-1], ",")
        if len(items) >= 2:
            return s[0] + s[-1], items
        return None
    items = _split_top(s, ",")
    if len(items) >= 2:
        return "set", [x for item in items for x in _expand_pm(item)]
    expanded = _expand_pm(s)
    if len(expanded) == 2:
        return "set", expanded
    return None


def _parse_matrix(s: str) -> list[list[str]] | None:
    """Rows of cells of a ``\\begin{pmatrix}...\\end{pmatrix}`` (or b/v/B/plain matrix), else None."""
    match = re.fullmatch(r"\\begin\{([pbvBV]?matrix)\}(.*)\\end\{\1\}", s, re.S)
    if not match:
        return None
    rows = [row for row in _split_top(match.group(2), "\\\\") if row.strip()]
    return [_split_top(row, "&") for row in rows]


def _items_equal(a: list[str], b: list[str], ordered: bool, depth: int) -> bool:
    """Element-wise equivalence of two item lists, in order or as multisets (greedy matching)."""
    if len(a) != len(b):
        return False
    if ordered:
        return all(_equivalent_normalized(_normalize(x), _normalize(y), depth + 1) for x, y in zip(a, b))
    unused = [_normalize(y) for y in b]
    for x in a:
        x = _normalize(x)
        hit = next((k for k, y in enumerate(unused) if _equivalent_normalized(x, y, depth + 1)), None)
        if hit is None:
            return False
        unused.pop(hit)
    return True


def _structures_equal(a: str, b: str, depth: int) -> bool | None:
    """Compare matrices / collections; None when neither side is structured."""
    mat_a, mat_b = _parse_matrix(a), _parse_matrix(b)
    if mat_a is not None or mat_b is not None:
        if mat_a is not None and mat_b is not None:
            if [len(r) for r in mat_a] != [len(r) for r in mat_b]:
                return False
            return _items_equal(sum(mat_a, []), sum(mat_b, []), True, depth)
        matrix, other = (mat_a, b) if mat_a is not None else (mat_b, a)
        coll = _as_collection(other)
        is_vector = len(matrix) == 1 or all(len(r) == 1 for r in matrix)
        if coll is None or coll[0] != "()" or not is_vector:
            return False
        return _items_equal(sum(matrix, []), coll[1], True, depth)
    coll_a, coll_b = _as_collection(a), _as_collection(b)
    if coll_a is None and coll_b is None:
        return None
    if coll_a is None or coll_b is None or coll_a[0] != coll_b[0]:
        return False
    ordered = coll_a[0] not in ("set", "union")
    return _items_equal(coll_a[1], coll_b[1], ordered, depth)


# ----------------------------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------------------------

def _parse_number(s: str) -> tuple[Fraction, bool] | None:
    """(value, is_approximate) for integers, decimals, scientific, ``a/b``, ``\\frac{a}{b}``, mixed numbers."""
    if re.search(r"[eE][+-]?\d{4,}", s):
        return None  # 1e99999999 would build a gigantic integer
    try:
        if re.fullmatch(_NUM, s):
            return Fraction(s), bool(re.search(r"[.eE]", s))
        match = re.fullmatch(rf"({_NUM})/({_NUM})", s)
        if match:
            return Fraction(match.group(1)) / Fraction(match.group(2)), "." in s
        match = re.fullmatch(rf"([+-]?)\\frac\{{({_NUM})\}}\{{({_NUM})\}}", s)
        if match:
            value = Fraction(match.group(2)) / Fraction(match.group(3))
            return (-value if match.group(1) == "-" else value), "." in s
        match = re.fullmatch(r"([+-]?)(\d+)\\frac\{(\d+)\}\{(\d+)\}", s)
        if match:
            value = int(match.group(2)) + Fraction(int(match.group(3)), int(match.group(4)))
            return (-value if match.group(1) == "-" else value), False
        match = re.fullmatch(rf"(?:({_NUM})(?:\\times|\\cdot|\*))?10\^\{{?([+-]?\d{{1,3}})\}}?", s)
        if match:
            mantissa = Fraction(match.group(1)) if match.group(1) else Fraction(1)
            return mantissa * Fraction(10) ** int(match.group(2)), True
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _numbers_close(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    """Exact equality for exact numbers; relative 1e-4 (absolute 1e-8 near zero) if either is a decimal."""
    (x, approx_x), (y, approx_y) = a, b
    if not (approx_x or approx_y):
        return x == y
    return abs(x - y) <= max(NUMERIC_REL_TOL * max(abs(x), abs(y)), NUMERIC_ABS_TOL)


def _same_base_digits(a: str, b: str) -> bool:
    """``52_8`` vs ``52``: the same digits, one side carrying a base subscript."""
    pattern = r"([0-9A-Z]*[0-9][0-9A-Z]*)_(\d+)"
    match_a, match_b = re.fullmatch(pattern, a), re.fullmatch(pattern, b)
    if bool(match_a) == bool(match_b):
        return False
    digits = (match_a or match_b).group(1)
    return digits == (b if match_a else a)


# ----------------------------------------------------------------------------------------------
# LaTeX -> sympy
# ----------------------------------------------------------------------------------------------

def _variable(name: str) -> str:
    """Identifier emitted for a variable letter (``e`` and ``i`` are Euler's number and the imaginary unit)."""
    return {"e": " euler ", "i": " imagunit "}.get(name, f" v_{name} ")


def _python_number(number: str) -> str:
    """A digit string as a valid Python literal (``025`` -> ``25``; Python rejects leading zeros)."""
    if "." in number:
        return number
    return number.lstrip("0") or "0"


def _latex_to_sympy_text(s: str) -> str | None:
    """Translate simple LaTeX math into text for `parse_expr`; None on anything unsupported."""
    out: list[str] = []
    i = 0
    while i < len(s):
        char = s[i]
        if char.isspace():
            i += 1
        elif char.isdigit() or (char == "." and s[i + 1:i + 2].isdigit()):
            number = re.match(r"\d*\.?\d+|\d+\.?", s[i:]).group(0)
            i += len(number)
            if i < len(s) and s[i] == "!":
                if float(number) > 1000 or "." in number:
                    return None
                out.append(f" factorial({_python_number(number)}) ")
                i += 1
            else:
                out.append(f" {_python_number(number)} ")
        elif char.isalpha():
            run = re.match(r"[a-zA-Z]+", s[i:]).group(0)
            i += len(run)
            if run in _FUNCTIONS:
                out.append(f" {_FUNCTIONS[run]} ")
            elif run == "pi":
                out.append(" pi ")
            elif len(run) > 2:
                return None
            else:
                out.extend(_variable(letter) for letter in run)
        elif char == "\\":
            piece, i = _command_to_sympy(s, i)
            if piece is None:
                return None
            out.append(piece)
        elif char in "^_":
            arg = _read_arg(s, i + 1)
            if arg is None:
                return None
            inner = _latex_to_sympy_text(arg[0])
            if inner is None:
                return None
            if char == "^":
                out.append(f"**({inner})")
            else:
                if not out or not out[-1].startswith(" v_") or not re.fullmatch(r"[a-zA-Z0-9]+", arg[0]):
                    return None
                out[-1] = out[-1].rstrip() + f"_{arg[0]} "
            i = arg[1]
        elif char in "{([":
            out.append("(")
            i += 1
        elif char in "})]":
            out.append(")")
            i += 1
        elif char in "+-*/":
            out.append(char)
            i += 1
        else:
            return None
    return "".join(out)


def _command_to_sympy(s: str, i: int) -> tuple[str | None, int]:
    """Translate the ``\\command`` (with its arguments) at `s[i]`; returns (text or None, next index)."""
    match = re.match(r"\\([a-zA-Z]+|.)", s[i:])
    if not match:
        return None, i
    name, j = match.group(1), i + len(match.group(0))
    if name == "frac":
        num = _read_arg(s, j)
        den = _read_arg(s, num[1]) if num else None
        if num is None or den is None:
            return None, j
        top, bottom = _latex_to_sympy_text(num[0]), _latex_to_sympy_text(den[0])
        if top is None or bottom is None:
            return None, j
        return f"(({top})/({bottom}))", den[1]
    if name == "sqrt":
        index = None
        if j < len(s) and s[j] == "[" and "]" in s[j:]:
            close = s.index("]", j)
            index, j = _latex_to_sympy_text(s[j + 1:close]), close + 1
            if index is None:
                return None, j
        arg = _read_arg(s, j)
        radicand = _latex_to_sympy_text(arg[0]) if arg else None
        if radicand is None:
            return None, j
        text = f"sqrt({radicand})" if index is None else f"(({radicand})**(1/({index})))"
        return text, arg[1]
    simple = {"cdot": "*", "times": "*", "div": "/", "pi": " pi ", "infty": " oo "}
    if name in simple:
        return simple[name], j
    if name in _FUNCTIONS:
        return f" {_FUNCTIONS[name]} ", j
    if name in _GREEK:
        return f" v_{name} ", j
    return None, j


def _too_expensive(text: str) -> bool:
    """Guard against evaluations a timer cannot interrupt (one huge C-level integer power): refuse
    power towers, and expressions whose integer exponents of 10 or more multiply to over 10**8."""
    budget = 1
    for match in re.finditer(r"\*\*\(", text):
        depth, k = 1, match.end()
        while k < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[k], 0)
            k += 1
        exponent = text[match.end():k - 1]
        if "**" in exponent:
            return True
        for number in re.findall(r"\d+", exponent):
            budget *= max(int(number), 1) if int(number) >= 10 else 1
            if budget > 10**8:
                return True
    return len(text) > 2000


def _to_sympy(s: str) -> sympy.Expr | None:
    """Parse a normalised LaTeX answer into a sympy expression, or None."""
    text = _latex_to_sympy_text(s)
    if text is None or not text.strip() or re.search(r"\(\s*\)", text) or _too_expensive(text):
        return None
    local = {name: sympy.Symbol(name[2:]) for name in set(re.findall(r"\bv_\w+", text))}
    local.update(euler=sympy.E, imagunit=sympy.I)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expr = parse_expr(text, local_dict=local, transformations=_TRANSFORMS)
    return expr if isinstance(expr, sympy.Expr) else None


# ----------------------------------------------------------------------------------------------
# Time limits and sympy comparison
# ----------------------------------------------------------------------------------------------

class _TimeLimitExceeded(BaseException):
    """Raised inside a `_time_limit` block when its timer fires (a BaseException, so that sympy's own
    ``except Exception`` clauses cannot swallow it)."""


def _can_time_limit() -> bool:
    """True if a SIGALRM timer can be used here (main thread, POSIX, no outer interval timer running)."""
    return (hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
            and signal.getitimer(signal.ITIMER_REAL)[0] == 0)


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[bool]:
    """Raise `_TimeLimitExceeded` in the body after `seconds` (yields False, and limits nothing, when
    `_can_time_limit()` is False).  The previous SIGALRM handler is restored afterwards."""
    if not _can_time_limit():
        yield False
        return
    state = {"done": False}

    def _on_alarm(signum: int, frame: object) -> None:
        if not state["done"]:
            raise _TimeLimitExceeded()

    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.05)  # re-fires every 50 ms until disarmed
    try:
        yield True
    finally:
        state["done"] = True
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _run_limited(fn: Callable[[], T], seconds: float) -> tuple[bool, T | None]:
    """(True, fn()) if it finished in time without raising; (False, None) on timeout or error."""
    try:
        with _time_limit(seconds):
            return True, fn()
    except (Exception, _TimeLimitExceeded):  # noqa: BLE001 - sympy raises many kinds of errors; never propagate
        return False, None


def _numeric_verdict(a: sympy.Expr, b: sympy.Expr, approximate: bool) -> bool | None:
    """Compare `a` and `b` numerically at a few fixed random points of their free symbols.

    True if equal at every point that evaluates to a finite number, False if they differ at one,
    None if no point could be evaluated."""
    symbols = sorted(a.free_symbols | b.free_symbols, key=str)
    rng = random.Random(20240607)
    points = [{sym: sympy.Float(rng.uniform(0.3, 2.7), 30) for sym in symbols} for _ in range(3 if symbols else 1)]
    rel_tol, abs_tol = (NUMERIC_REL_TOL, NUMERIC_ABS_TOL) if approximate else (1e-12, 1e-20)
    evaluated = 0
    for point in points:
        try:
            va = complex(a.evalf(30, subs=point))
            vb = complex(b.evalf(30, subs=point))
            diff = abs(complex((a - b).evalf(30, subs=point)))
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            continue
        values = (abs(va), abs(vb), diff)
        if any(v != v or v == float("inf") for v in values):
            continue
        evaluated += 1
        if diff > max(rel_tol * max(abs(va), abs(vb)), abs_tol):
            return False
    return True if evaluated else None


def _sympy_equal(a: str, b: str) -> bool:
    """Equivalence of two LaTeX expressions via sympy: numeric check, then time-limited simplify,
    then (off the main thread or after a timeout) a cheap ``expand(a - b) == 0``."""
    ok, parsed = _run_limited(lambda: (_to_sympy(a), _to_sympy(b)), SYMPY_TIME_LIMIT_S)
    if not ok or parsed is None or parsed[0] is None or parsed[1] is None:
        return False
    ea, eb = parsed
    approximate = bool(re.search(r"\d?\.\d", a + " " + b))
    ok, verdict = _run_limited(lambda: _numeric_verdict(ea, eb, approximate), SYMPY_TIME_LIMIT_S)
    if ok and verdict is not None:
        return verdict
    if _can_time_limit():
        ok, is_zero = _run_limited(lambda: sympy.simplify(ea - eb) == 0, SYMPY_TIME_LIMIT_S)
        if ok:
            return bool(is_zero)
    ok, is_zero = _run_limited(lambda: sympy.expand(ea - eb) == 0, CHEAP_TIME_LIMIT_S)
    return bool(ok and is_zero)


def _equations_equal(a: str, b: str, depth: int) -> bool:
    """``lhs = rhs`` pairs: equal right-hand sides under equal left-hand sides, or proportional
    ``lhs - rhs`` (so ``5x - 7y + 4 = 0`` matches ``-5x + 7y - 4 = 0``)."""
    sides_a, sides_b = _split_top(a, "="), _split_top(b, "=")
    if len(sides_a) != 2 or len(sides_b) != 2:
        return False
    (la, ra), (lb, rb) = sides_a, sides_b
    if _equivalent_normalized(la, lb, depth + 1) and _equivalent_normalized(ra, rb, depth + 1):
        return True

    def proportional() -> bool:
        ea, eb = _to_sympy(f"({la})-({ra})"), _to_sympy(f"({lb})-({rb})")
        if ea is None or eb is None or ea == 0 or eb == 0:
            return False
        symbols = sorted(ea.free_symbols | eb.free_symbols, key=str)
        rng = random.Random(7)
        ratios = []
        for _ in range(3):
            point = {sym: sympy.Float(rng.uniform(0.3, 2.7), 30) for sym in symbols}
            ratios.append(complex((ea / eb).evalf(30, subs=point)))
        return abs(ratios[0]) > 1e-12 and all(abs(r - ratios[0]) <= 1e-9 * abs(ratios[0]) for r in ratios)

    ok, result = _run_limited(proportional, SYMPY_TIME_LIMIT_S)
    return bool(ok and result)


# ----------------------------------------------------------------------------------------------
# Equivalence
# ----------------------------------------------------------------------------------------------

def _is_text(s: str) -> bool:
    """Answers made only of letters: a single letter (multiple-choice) or a word of 3+ letters."""
    return bool(re.fullmatch(r"[A-Za-z]|[A-Za-z'\-]{3,}", s))


def _equivalent_normalized(a: str, b: str, depth: int = 0) -> bool:
    """Equivalence of two already-normalised answers (see `is_equivalent`)."""
    if a == b:
        return True
    if not a or not b or depth > MAX_RECURSION:
        return False
    if _is_text(a) and _is_text(b):
        return a.lower() == b.lower()
    if _same_base_digits(a, b):
        return True
    structured = _structures_equal(a, b, depth)
    if structured is not None:
        return structured
    num_a, num_b = _parse_number(a), _parse_number(b)
    if num_a is not None and num_b is not None:
        return _numbers_close(num_a, num_b)
    if "=" in a or "=" in b:
        return _equations_equal(a, b, depth)
    return _sympy_equal(a, b)


def is_equivalent(predicted: str | None, gold: str) -> bool:
    """Whether the predicted answer denotes the same value / object as the gold answer.

    `predicted` is typically the output of `extract_answer`; None is never equivalent.  Never raises:
    anything that fails to parse falls back to comparing normalised strings.
    """
    if predicted is None or gold is None:
        return False
    try:
        return _equivalent_normalized(_normalize(predicted), _normalize(gold))
    except (Exception, _TimeLimitExceeded):  # noqa: BLE001 - a grader must not crash an evaluation run
        try:
            return _normalize(predicted) == _normalize(gold)
        except Exception:  # noqa: BLE001
            return predicted.strip() == gold.strip()
