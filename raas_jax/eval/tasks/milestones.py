"""The "milestones" task: long step-by-step modular sums with lemmas (milestones) and prompt constants (phoenix
tokens), for measuring accuracy vs KV budget per cache policy on a small model trained here.

Word-level tokens separated by single spaces (docs/milestones_task.md has the full description):

    prompt:    K0 = 37 , K1 = 12 , ... , K15 = 85 ; m0 = 42 ; steps m120 :
    solution:  m1 = m0 = 42 ; m2 = m1 + m0 = 42 + 42 = 84 ; ... ;
               m41 = m40 + m32 + K10 = 12 + 45 = 57 + 33 = 90 ; m42 = m41 + m32 = 90 + 45 = 35 ; ...
               answer m120 = 35

Step i adds (mod 100) m{i-1}, the lemma m{16*floor((i-1)/16)} (when it is not m{i-1}) and, when i % 4 == 0,
the constant K{(i//4) % 16}. Problems are a pure function of (seed, index, difficulty): training uses seeds
>= TRAIN_SEED_MIN, evaluation seeds below it (EVAL_SEED by default). No jax here: plain, seeded Python.

The decode-phoenix variant (`recall=True`, dataset `phoenix:D`) says `recall steps m{N} :` in the prompt, and every
step i with i % 16 == 6 and i >= RECALL_GAP + 6 also adds m{i - RECALL_GAP}, a step result that nothing has read
since step i - RECALL_GAP + 1 (about 1250 tokens earlier):

    m102 = m101 + m96 + m6 = 99 + 58 = 57 + 46 = 03 ;
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

NUM_CONSTANTS = 16
LEMMA_SPAN = 16  # lemma m{16b} is used by steps 16b+1 .. 16b+16
CONST_EVERY = 4  # steps i with i % 4 == 0 add K{(i//4) % 16}
MAX_STEPS = 511  # names m0..m511 are in the vocabulary
MOD = 100
RECALL_GAP = 96  # recall steps i (i % 16 == 6, i >= RECALL_GAP + 6) add m{i - RECALL_GAP}
RECALL_PHASE = 6  # i % 16 of a recall step: i % 4 == 2, so never a constant step
# difficulty -> inclusive range of the number of steps N (solution ~11.75 tokens per step)
DIFFICULTIES = {1: (30, 60), 2: (60, 120), 3: (120, 200), 4: (200, 300)}
TRAIN_SEED_MIN = 1_000_000  # training problems: seeds >= this; evaluation: seeds < this
EVAL_SEED = 0

SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
WORDS = ("=", "+", ",", ";", ":", "steps", "answer", "recall")  # new words go at the end: old ids stay

# the role of each token of a step line, by line shape (used to explain a wrong step)
ROLES_COPY = ("name", "=", "prev", "=", "prev_value", ";")
ROLES_TWO = ("name", "=", "prev", "+", "lemma", "=", "prev_value", "+", "lemma_value", "=", "sum", ";")
ROLES_THREE = ("name", "=", "prev", "+", "lemma", "+", "const", "=", "prev_value", "+", "lemma_value", "=",
               "partial_sum", "+", "const_value", "=", "sum", ";")
ROLES_RECALL = ("name", "=", "prev", "+", "lemma", "+", "recall", "=", "prev_value", "+", "lemma_value", "=",
                "partial_sum", "+", "recall_value", "=", "sum", ";")


def vocabulary() -> list[str]:
    """The fixed vocabulary, in id order: specials, m0..m511, K0..K15, 00..99, punctuation and words."""
    return (list(SPECIALS) + [f"m{i}" for i in range(MAX_STEPS + 1)] + [f"K{j}" for j in range(NUM_CONSTANTS)]
            + [f"{v:02d}" for v in range(MOD)] + list(WORDS))


def lemma_index(i: int) -> int:
    """The lemma used by step i >= 1: m{16*floor((i-1)/16)}."""
    return LEMMA_SPAN * ((i - 1) // LEMMA_SPAN)


def const_index(i: int) -> int | None:
    """The constant used by step i, or None."""
    return (i // CONST_EVERY) % NUM_CONSTANTS if i % CONST_EVERY == 0 else None


def recall_index(i: int, recall: bool = True) -> int | None:
    """The step result that step i of the decode-phoenix variant recalls (i - RECALL_GAP), or None."""
    if recall and i % LEMMA_SPAN == RECALL_PHASE and i >= RECALL_GAP + RECALL_PHASE:
        return i - RECALL_GAP
    return None


def operands(i: int, recall: bool = False) -> list[str]:
    """Operand names of step i, in line order: m{i-1}, the lemma, then the constant or the recalled result."""
    lem, c, r = lemma_index(i), const_index(i), recall_index(i, recall)
    return ([f"m{i - 1}"] + ([f"m{lem}"] if lem != i - 1 else []) + ([f"K{c}"] if c is not None else [])
            + ([f"m{r}"] if r is not None else []))


def step_words(i: int, m: Sequence[int], k: Sequence[int], recall: bool = False) -> list[str]:
    """The words of step i (values m[0..i], constants k), ending with ';'."""
    names = operands(i, recall)
    values = [k[int(n[1:])] if n[0] == "K" else m[int(n[1:])] for n in names]
    words = [f"m{i}", "="]
    for j, name in enumerate(names):
        words += (["+"] if j else []) + [name]
    words += ["=", f"{values[0]:02d}"]
    acc = values[0]
    for v in values[1:]:
        acc = (acc + v) % MOD
        words += ["+", f"{v:02d}", "=", f"{acc:02d}"]
    assert acc == m[i]
    return words + [";"]


def step_roles(i: int, recall: bool = False) -> tuple[str, ...]:
    if lemma_index(i) == i - 1:
        return ROLES_COPY
    if recall_index(i, recall) is not None:
        return ROLES_RECALL
    return ROLES_THREE if const_index(i) is not None else ROLES_TWO


@dataclasses.dataclass(frozen=True)
class Problem:
    seed: int
    index: int
    difficulty: int | None
    n_steps: int
    constants: tuple[int, ...]
    values: tuple[int, ...]  # m0 .. mN
    recall: bool = False  # the decode-phoenix variant

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def gold(self) -> str:
        """What the answer line states after 'answer': 'm{N} = VV'."""
        return f"m{self.n_steps} = {self.answer:02d}"

    def prompt_words(self) -> list[str]:
        words = []
        for j, v in enumerate(self.constants):
            words += [f"K{j}", "=", f"{v:02d}", "," if j < NUM_CONSTANTS - 1 else ";"]
        return (words + ["m0", "=", f"{self.values[0]:02d}", ";"] + (["recall"] if self.recall else [])
                + ["steps", f"m{self.n_steps}", ":"])

    def step_words(self, i: int) -> list[str]:
        return step_words(i, self.values, self.constants, self.recall)

    def step_roles(self, i: int) -> tuple[str, ...]:
        return step_roles(i, self.recall)

    def recall_steps(self) -> list[int]:
        """The steps that recall an old result (empty for the plain task)."""
        return [i for i in range(1, self.n_steps + 1) if recall_index(i, self.recall) is not None]

    def solution_words(self) -> list[str]:
        words = []
        for i in range(1, self.n_steps + 1):
            words += self.step_words(i)
        return words + ["answer", f"m{self.n_steps}", "=", f"{self.answer:02d}"]

    @property
    def prompt(self) -> str:
        return " ".join(self.prompt_words())

    @property
    def solution(self) -> str:
        """The gold continuation without the final <eos>."""
        return " ".join(self.solution_words())


FIRST_RECALL_STEP = RECALL_GAP + RECALL_PHASE  # 102


def phoenix_difficulties() -> list[int]:
    """The difficulties at which the decode-phoenix variant has a recall step (N >= 102) in some problem."""
    return [d for d, (_, hi) in sorted(DIFFICULTIES.items()) if hi >= FIRST_RECALL_STEP]


def make_problem(seed: int, index: int, difficulty: int | None = None, n_steps: int | None = None,
                 recall: bool = False) -> Problem:
    """Problem `index` of `seed`: a pure function of (seed, index, difficulty or n_steps, recall). The
    decode-phoenix variant (`recall`) draws from its own random stream, so its problems differ from the plain
    task's; it refuses a difficulty none of whose problems would have a recall step."""
    if (difficulty is None) == (n_steps is None):
        raise ValueError("give exactly one of difficulty, n_steps")
    task = "phoenix" if recall else "milestones"
    rng = random.Random(f"{task}:{seed}:{index}:{difficulty}:{n_steps}")
    if difficulty is not None:
        if difficulty not in DIFFICULTIES:
            raise ValueError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got {difficulty}")
        if recall and difficulty not in phoenix_difficulties():
            raise ValueError(f"difficulty {difficulty} ({DIFFICULTIES[difficulty][0]}-{DIFFICULTIES[difficulty][1]} "
                             f"steps) has no recall step (the first is step {FIRST_RECALL_STEP}): the decode-phoenix "
                             f"variant takes difficulties {phoenix_difficulties()}")
        lo, hi = DIFFICULTIES[difficulty]
        n_steps = rng.randint(lo, hi)
    if not 1 <= n_steps <= MAX_STEPS:
        raise ValueError(f"n_steps must lie in [1, {MAX_STEPS}], got {n_steps}")
    constants = tuple(rng.randrange(MOD) for _ in range(NUM_CONSTANTS))
    m = [rng.randrange(MOD)]
    for i in range(1, n_steps + 1):
        lem, c, r = lemma_index(i), const_index(i), recall_index(i, recall)
        v = (m[i - 1] + (m[lem] if lem != i - 1 else 0) + (constants[c] if c is not None else 0)
             + (m[r] if r is not None else 0))
        m.append(v % MOD)
    return Problem(seed, index, difficulty, n_steps, constants, tuple(m), recall)


def eval_problems(difficulty: int, limit: int, seed: int = EVAL_SEED, recall: bool = False) -> list[Problem]:
    """Held-out problems 0..limit-1 of an evaluation seed (`recall`: the decode-phoenix variant)."""
    if seed >= TRAIN_SEED_MIN:
        raise ValueError(f"evaluation seeds must be < {TRAIN_SEED_MIN} (training uses the seeds above)")
    return [make_problem(seed, i, difficulty=difficulty, recall=recall) for i in range(limit)]


def train_problems(seed: int, difficulties: Sequence[int] | None = None, start: int = 0,
                   recall: bool = False) -> Iterator[Problem]:
    """An endless stream of training problems of seed TRAIN_SEED_MIN + seed, cycling over `difficulties` (default:
    all of them; for the decode-phoenix variant, those with recall steps)."""
    if seed < 0:
        raise ValueError("the training seed offset must be >= 0")
    if difficulties is None:
        difficulties = phoenix_difficulties() if recall else sorted(DIFFICULTIES)
    index = start
    while True:
        yield make_problem(TRAIN_SEED_MIN + seed, index, difficulty=difficulties[index % len(difficulties)],
                           recall=recall)
        index += 1


# ----------------------------------------------------------------------------------- checking

_ANSWER = re.compile(r"answer\s+(m\d+)\s*=\s*(\d{2})(?!\d)")


def parse_answer(text: str) -> str | None:
    """'m{N} = VV' from the first 'answer m{N} = VV' in generated text, or None."""
    match = _ANSWER.search(text)
    return None if match is None else f"{match.group(1)} = {match.group(2)}"


def check_answer(text: str, gold: str) -> bool:
    """Exact check: the generated answer line names the same final step and value as `gold` ('m{N} = VV')."""
    return parse_answer(text) == gold


@dataclasses.dataclass(frozen=True)
class StepError:
    step: int  # 1..N, or N+1 for the answer line
    role: str  # which token of the line is wrong (name, prev_value, lemma_value, const_value, recall_value, sum, ...)
    expected: str  # the gold line
    got: str  # the generated line (may be cut short)


def first_wrong_step(problem: Problem, text: str) -> StepError | None:
    """The first step of a generated solution that differs from the gold one (None: all steps and answer right)."""
    got = text.split()
    pos = 0
    for i in range(1, problem.n_steps + 2):
        if i <= problem.n_steps:
            gold, roles = problem.step_words(i), problem.step_roles(i)
        else:
            gold, roles = problem.solution_words()[-4:], ("answer", "name", "=", "answer_value")
        line = got[pos:pos + len(gold)]
        for j, word in enumerate(gold):
            if j >= len(line) or line[j] != word:
                cut = got[pos:pos + (got[pos:].index(";") + 1 if ";" in got[pos:] else len(gold))]
                return StepError(i, roles[j] if j < len(line) else "missing", " ".join(gold), " ".join(cut))
        pos += len(gold)
    return None


# ----------------------------------------------------------------------------------- tokenizer

def build_tokenizer():
    """A `tokenizers` WordLevel tokenizer over `vocabulary()`; encoding prepends <bos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # no decoder: decoding joins the words with single spaces
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])
    for special in SPECIALS:
        tok.add_special_tokens([special])
    return tok


def save_tokenizer(out: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json (+ special_tokens_map.json): eos <eos>, bos <bos>, no chat template."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=build_tokenizer(), bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))
    config_path = Path(out) / "tokenizer_config.json"  # a class name transformers 4.x and 5.x both know
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


class Ids:
    """Word -> id without the tokenizer (fast path for training data)."""

    def __init__(self):
        self.words = vocabulary()
        self.id = {w: i for i, w in enumerate(self.words)}
        self.pad, self.bos, self.eos = self.id["<pad>"], self.id["<bos>"], self.id["<eos>"]

    def __len__(self) -> int:
        return len(self.words)

    def problem(self, problem: Problem) -> tuple[list[int], list[int]]:
        """(<bos> + prompt ids, solution ids + <eos>)."""
        ids = self.id
        return ([self.bos] + [ids[w] for w in problem.prompt_words()],
                [ids[w] for w in problem.solution_words()] + [self.eos])


def solution_roles(problem: Problem) -> list[tuple[str, int | None]]:
    """(role, step) of every solution token, <eos> included (step None on the answer line and <eos>)."""
    roles = [(r, i) for i in range(1, problem.n_steps + 1) for r in problem.step_roles(i)]
    return roles + [("answer", None), ("answer_name", None), ("=", None), ("answer_value", None), ("eos", None)]


def token_lengths(problem: Problem) -> tuple[int, int]:
    """(prompt tokens with <bos>, solution tokens with <eos>)."""
    return len(problem.prompt_words()) + 1, len(problem.solution_words()) + 1
