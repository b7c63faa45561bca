"""Tests for raas_jax.eval.answers: answer extraction and math-answer equivalence."""

from __future__ import annotations

import json
import re
import threading
import time
from pathlib import Path

import pytest

from raas_jax.eval.answers import extract_answer, is_equivalent

DATA = Path("/work/shared/data")
MATH500 = DATA / "math500_test.jsonl"
AIME24 = DATA / "aime24_test.jsonl"
GSM8K = DATA / "gsm8k_test.jsonl"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------
# extract_answer
# ------------------------------------------------------------------------------------------------

EXTRACTION_CASES = [
    # nested braces
    (r"So the ratio is $\boxed{\frac{1}{\sqrt{2}}}$.", r"\frac{1}{\sqrt{2}}"),
    # several boxes: the last one wins
    (r"First $\boxed{3}$, but after fixing the mistake we get $\boxed{5}$.", "5"),
    # \boxed without braces
    (r"Thus the answer is $\boxed 7$.", "7"),
    (r"\fbox{12} is the count", "12"),
    # boxed set / tuple / interval with escaped braces and \left \right
    (r"$\boxed{\{1\pm\sqrt{5},-2\}}$", r"\{1\pm\sqrt{5},-2\}"),
    (r"polar: $\boxed{\left( 3, \frac{\pi}{2} \right)}.$", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}}", r"\begin{pmatrix} -1 & 0 \\ 0 & -1 \end{pmatrix}"),
    # unterminated last box: fall back to the last complete one
    (r"\boxed{4} ... \boxed{\frac{1}{2", "4"),
    # GSM8K gold
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("Total is 2,125 dollars.\n#### 2,125", "2,125"),
    ("#### -10\n", "-10"),
    # phrases
    ("The answer is 42.", "42"),
    ("So, the final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}"),
    ("Some work.\nAnswer: 3.5", "3.5"),
    ("the answer is 12. Wait, recheck... The answer is 13.", "13"),
    ("THE ANSWER IS: **C**", "C"),
    # nothing to extract
    ("I am not sure how to solve this problem.", None),
    ("", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACTION_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_boxed_beats_hashes_and_phrases():
    text = "The answer is 3.\n#### 4\nso \\boxed{5}"
    assert extract_answer(text) == "5"
    assert extract_answer("The answer is 3.\n#### 4") == "4"


# ------------------------------------------------------------------------------------------------
# is_equivalent: (predicted, gold, expected)
# ------------------------------------------------------------------------------------------------

EQUIVALENT = [
    # integers, GSM8K style
    ("18", "18"),
    ("1,450,000", "1450000"),
    ("\\$32,\\!348", "32348"),
    ("$18", "18"),
    ("18 dollars", "18"),
    ("-10", "-10"),
    ("11,\\! 111,\\! 111,\\! 100", "11111111100"),
    ("10080", "10,\\!080"),
    # decimals / fractions
    ("0.5", "\\frac{1}{2}"),
    ("1/2", "\\frac12"),
    ("\\dfrac{17}{50}", "0.34"),
    ("\\tfrac{4}{3}", "\\frac43"),
    ("\\frac{9}{19}", "\\frac9{19}"),
    ("\\frac{5}{9}", "\\frac 59"),
    ("-\\frac{35}{9}", "\\frac{-35}{9}"),
    ("6.72\\times 10^{-5}", ".0000672"),
    ("18.9", "\\$18.90"),
    ("1\\frac{4}{5}", "\\frac{9}{5}"),
    ("275/2", "137 \\frac{1}{2}"),
    ("5.4", "5.4 \\text{ cents}"),
    ("20\\%", "20"),
    ("20 percent", "20"),
    # radicals, pi, i
    ("11\\sqrt{2}", "11\\sqrt2"),
    ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}"),
    ("\\sqrt{52}", "2\\sqrt{13}"),
    ("\\frac{3}{4}\\sqrt{3}", "\\frac{3\\sqrt{3}}{4}"),
    ("\\sqrt[3]{8}", "2"),
    ("2^{10}", "1024"),
    ("\\pi \\cdot 288", "288 \\pi"),
    ("-\\frac{1}{6}\\pi", "-\\frac{\\pi}{6}"),
    ("2\\pi+18", "18+2\\pi"),
    ("7i - 2", "-2 + 7i"),
    ("\\frac{20000}{\\pi}", "\\frac{20000}{\\pi}"),
    # degrees and units
    ("90", "90^\\circ"),
    ("30^{\\circ}", "30^\\circ"),
    ("145 degrees", "145^\\circ"),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}"),
    ("864", "864 \\mbox{ inches}^2"),
    ("15 \\text{cm}^2", "15\\mbox{ cm}^2"),
    # text answers
    ("Evelyn", "\\text{Evelyn}"),
    ("\\text{(C)}", "C"),
    ("(c)", "\\text{(C)}"),
    ("\\textbf{East}", "\\text{east}"),
    ("monday", "Monday"),
    # variable assignment, equations, expressions
    ("5", "x=5"),
    ("x = 5", "5"),
    ("y=3+2x", "y = 2x + 3"),
    ("-2x", "y = -2x"),
    ("-5x + 7y - 11z - 4 = 0", "5x - 7y + 11z + 4 = 0"),
    ("-q + p", "p - q"),
    ("(b+2)(a+5)", "(a+5)(b+2)"),
    ("x^3 + 3x - 6", "x^3+3x-6"),
    ("\\frac{9a+11}{20}", "\\frac{11+9a}{20}"),
    ("2(k+1)", "2k+2"),
    ("2(3r^2-2r-12)", "6r^2-4r-24"),
    ("\\frac{\\cos x}{\\sin x}", "\\cot x"),
    ("(x^4+x^3+x^2+x+1)(x^4+1)-x^4", "x^8 + x^7 + x^6 + x^5 + x^4 + x^3 + x^2 + x + 1"),
    ("3r^2 \\cdot 1", "3r^2"),
    ("\\sin^2 x + \\cos^2 x", "1"),
    ("10!", "3628800"),
    ("2^{2023}\\cdot 2", "2^{2024}"),
    ("a_2 + a_1", "a_1+a_2"),
    ("\\frac{\\sqrt5-1}{2}", "\\frac{-1+\\sqrt{5}}{2}"),
    ("\\sqrt{117}", "3\\sqrt{13}"),
    # tuples, intervals, sets, unions, +-
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("(6, 31, -1)", "(6,31,-1)"),
    ("\\left(1.5, -13\\right)", "\\left( \\frac{3}{2}, -13 \\right)"),
    ("(3, 4]", "(3,4]"),
    ("(2, \\infty)", "(2,\\infty)"),
    ("(-\\infty,0]", "(-\\infty, 0]"),
    ("[\\frac{\\pi^2}{8}, \\frac{5\\pi^2}{4}]", "\\left[ \\frac{\\pi^2}{8}, \\frac{5 \\pi^2}{4} \\right]"),
    ("[-2, 7]", "x \\in [-2,7]"),
    ("(3,\\infty) \\cup (-\\infty,2)", "(-\\infty, 2) \\cup (3, \\infty)"),
    ("7, 5, 3", "3, 5, 7"),
    ("-2, 1", "1,-2"),
    ("1+\\sqrt{19}, 1-\\sqrt{19}", "1 \\pm \\sqrt{19}"),
    ("3 - 2\\sqrt{2}, 3+2\\sqrt2", "3 \\pm 2 \\sqrt{2}"),
    ("-2, 1+\\sqrt5, 1-\\sqrt5", "\\{1\\pm\\sqrt{5},-2\\}"),
    # matrices
    ("\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}",
     "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}"),
    ("\\begin{bmatrix} -1 & 0 \\\\ 0 & -1 \\end{bmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}"),
    ("(-2, -14, -7)", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}"),
    # AIME: zero-padded gold, parenthesised option value
    ("25", "025"),
    ("\\textbf{(55) }", "055"),
    ("(x+1)", "x+1"),
    # bases
    ("4210_5", "4210_{5}"),
    ("52", "52_8"),
]

NOT_EQUIVALENT = [
    (None, "18"),
    # decided with math-verify (docs/design.md): a rounded decimal is not the exact answer; e^{i pi}
    # is not reduced by math-verify's parser (no gold answer is written so)
    ("0.3333", "\\frac{1}{3}"),
    ("1.4142", "\\sqrt{2}"),
    ("e^{i\\pi}", "-1"),
    ("17", "18"),
    ("13536", "13535"),  # integers are compared exactly, not within 1e-4
    ("70001", "70000"),
    ("0.33", "\\frac{1}{3}"),
    ("\\frac{1}{3}", "\\frac{1}{4}"),
    ("-\\frac{35}{9}", "\\frac{35}{9}"),
    ("\\sqrt{51}", "\\sqrt{53}"),
    ("3.14", "\\pi"),
    ("6+5i", "6 - 5i"),
    ("90", "\\frac{\\pi}{2}"),
    ("\\text{Navin}", "\\text{Evelyn}"),
    ("west", "\\text{east}"),
    ("tsea", "\\text{east}"),  # anagram: text is never multiplied out as symbols
    ("\\text{(B)}", "\\text{(C)}"),
    ("x^3+3x+6", "x^3+3x-6"),
    ("2k+1", "2k+2"),
    ("(a+5)(b+3)", "(a+5)(b+2)"),
    ("5x - 7y + 11z + 4 = 1", "5x - 7y + 11z + 4 = 0"),
    ("(3, 4)", "(3,4]"),
    ("[3, 4]", "(3,4]"),
    ("(2, 6)", "(2,4)"),
    ("(31, 6, -1)", "(6,31,-1)"),  # tuples are ordered
    ("1,2", "1,-2"),
    ("3, 5", "3, 5, 7"),
    ("1+\\sqrt{19}", "1 \\pm \\sqrt{19}"),
    ("(0,9)", "(0,9) \\cup (9,36)"),
    ("(0,9) \\cup (9,35)", "(0,9) \\cup (9,36)"),
    ("\\begin{pmatrix} -2 \\\\ 14 \\\\ -7 \\end{pmatrix}", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}"),
    ("\\begin{pmatrix} -1 & 0 \\end{pmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}"),
    ("528", "52_8"),
    ("42", "52_8"),
    ("x", "x_1"),
    ("1e99999999", "1"),
    ("", "5"),
    ("\\frac{1}{0}", "5"),
    ("\\boxed{", "5"),
    ("9^{9^{9^{9}}}", "5"),  # power towers are refused, not evaluated
    ("100000!", "5"),
    ("2^{2023}", "2^{2024}"),
    ("\\frac{\\pi}{2}", "1.57"),
    ("x^2", "y^2"),
]


@pytest.mark.parametrize(("predicted", "gold"), EQUIVALENT)
def test_equivalent(predicted, gold):
    assert is_equivalent(predicted, gold)
    assert is_equivalent(gold, predicted)


@pytest.mark.parametrize(("predicted", "gold"), NOT_EQUIVALENT)
def test_not_equivalent(predicted, gold):
    assert not is_equivalent(predicted, gold)
    if predicted is not None:
        assert not is_equivalent(gold, predicted)


@pytest.mark.parametrize("garbage", ["\\frac{", "}{", "\\sqrt", "((((", "x^", "\\left(", "$$", "1,,2", "\\begin{pmatrix}"])
def test_never_raises(garbage):
    assert isinstance(is_equivalent(garbage, "1"), bool)
    assert is_equivalent(garbage, garbage)


def test_off_main_thread_uses_cheap_check():
    results = {}

    def work():
        results["eq"] = is_equivalent("\\frac{\\cos x}{\\sin x}", "\\cot x")
        results["ne"] = is_equivalent("x^2+1", "x^2-1")

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert results == {"eq": True, "ne": False}


def test_sympy_time_limit_restores_signal_handler():
    import signal

    def handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGALRM, handler)
    try:
        assert is_equivalent("(x+1)^2", "x^2+2x+1")
        assert signal.getsignal(signal.SIGALRM) is handler
        assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    finally:
        signal.signal(signal.SIGALRM, previous)


def test_power_towers_are_refused_quickly_on_any_thread():
    results = {}

    def work():
        results["tower"] = is_equivalent("9^{9^{9^{9}}}", "5")
        results["factorial"] = is_equivalent("100000!", "5")

    start = time.monotonic()
    work()
    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert results == {"tower": False, "factorial": False}
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------------------------------
# Whole-dataset checks
# ------------------------------------------------------------------------------------------------

@pytest.mark.skipif(not MATH500.exists(), reason="MATH500 data not available")
def test_math500_gold_self_consistency_and_solution_extraction():
    rows = _rows(MATH500)
    start = time.monotonic()
    not_self = [r["answer"] for r in rows if not is_equivalent(r["answer"], r["answer"])]
    assert not_self == []
    misses = [(extract_answer(r["solution"]), r["answer"]) for r in rows
              if not is_equivalent(extract_answer(r["solution"]), r["answer"])]
    rate = 1 - len(misses) / len(rows)
    print(f"MATH500: self-consistency 100%, solution extraction {rate:.1%} ({len(misses)} misses)")
    assert rate >= 0.95, misses
    assert time.monotonic() - start < 30


@pytest.mark.skipif(not GSM8K.exists(), reason="GSM8K data not available")
def test_gsm8k_gold_extraction():
    rows = _rows(GSM8K)
    for row in rows:
        extracted = extract_answer(row["answer"])
        expected = row["answer"].rsplit("####", 1)[1].strip()
        assert extracted == expected
        value = float(extracted.replace(",", ""))
        assert is_equivalent(extracted, str(int(value)))
        assert re.fullmatch(r"-?\d+", str(int(value)))


@pytest.mark.skipif(not AIME24.exists(), reason="AIME24 data not available")
def test_aime24_gold_extraction():
    rows = _rows(AIME24)
    assert all(is_equivalent(str(r["answer"]), str(r["answer"])) for r in rows)
    assert all(is_equivalent(str(int(r["answer"])), str(r["answer"])) for r in rows)
    hits = sum(is_equivalent(extract_answer(r["solution"]), str(r["answer"])) for r in rows)
    assert hits >= len(rows) - 2  # one solution has no final-answer marker at all
