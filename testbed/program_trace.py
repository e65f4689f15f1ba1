"""A seeded synthetic reasoning task in ZoomR's format: tracing a small program.

The program has variables ``v0 .. vN``. ``v0`` is a constant; each step ``k = 1..N`` has an input
constant ``x_k`` and reads one earlier variable ``v_j`` (``j < k``): either its result or its
*intermediate* ``v_j'``. It computes (mod 10)::

    v_k' = v_{k-1} + src_k        src_k = v_j' (a "detail" read) or v_j (a "main" read)
    v_k  = v_k' - x_k

and the answer is ``v_N``. The prompt states the program as single-token facts: ``v0=4`` (v0
holds 4), ``v5#7`` (step 5's input is 7), ``v5<v2'`` (step 5 reads v2's intermediate) or
``v5<v2`` (reads v2's result). The reasoning writes one *thought* per step, then a blank line,
then a *summary* between the summary markers, then a blank line; a final line gives the answer::

    v4=1 v5 v5#7 v5<v2' v2=6 \\n v2=6 v2'=3 \\n V1 + V3 = V4 \\n check V4 - V3 = V1 \\n check V4 - V1 = V3 \\n
    check V3 + V1 = V4 \\n V4 - V7 = V7 \\n check V7 + V7 = V4 \\n check V4 - V7 = V7 \\n check V7 + V7 = V4 \\n
    v5=7 \\n v5'=4 \\n\\n <|begin_of_summary|> v5=7 <|end_of_summary|> \\n\\n

Every value is one token that also names its variable (``v2'=3``: v2's intermediate is 3), and
every fact a thought needs is one token that names the step it belongs to, so each token that
needs a fact is one content-addressed attention hop from the token before it: the first line
recalls the previous result (``v4=1``, the summary just above), names the step (``v5``), then
finds step 5's input and pointer in the prompt (``v5#7``, ``v5<v2'``) and v2's result (``v2=6``);
the next line repeats v2's result and, for a detail read, finds v2's intermediate. That is what makes the task learnable by a tiny
model in minutes; copying a multi-token statement needs an induction circuit that a tiny model did
not form within the budget. The eight arithmetic lines (two operations and six checks) are local
work that makes a thought about 65 tokens long.

The summary keeps the gist (the step's result) and drops the details (the operand values, the
input, the intermediate). A detail read ``v5<v2'`` needs v2's intermediate, which only v2's thought
holds: summary-only attention must guess it (1 in 10), zooming into v2's thought recovers it, and
since pointers reach anywhere back a recent window alone cannot answer. The detail lookup line
first recalls v2's result (``v2=6``, which v2's summary holds) right after a line break, which is
a ZoomR refresh point: that query attends to v2's summary, whose index key is exactly the key of
``v2=6``, so the vote picks v2, and the vote takes effect at the next token, the one that needs v2's
intermediate (``v2'=3``).

Each step is a bijection of ``v_{k-1}``, so one wrong value anywhere in the chain changes the
final answer (every step is on the answer's path).

That is the ``short`` task. The ``long`` one (:data:`TASKS`) has the proportions of a real trace:
24 work lines, each opened by a label (``w1 .. w24``), cycle through the eight arithmetic lines, so
a thought runs to about 200 tokens, and the summary keeps the step's name and input beside its
result (``<|begin_of_summary|> v5 v5#7 v5=7 <|end_of_summary|>``); problems of 10-16 steps.

Every word is one token; the text is its tokens joined by single spaces (newlines included:
``" \\n "``), so a word-level tokenizer that splits on spaces and keeps ``"\\n"`` / ``"\\n\\n"`` as
tokens round-trips it exactly. :func:`vocabulary` lists every word for up to :data:`MAX_STEPS`.

Thought indices follow ZoomR's segmentation of the generated text
(:class:`zoomr_sglang.algo.segmentation.ThoughtSegmenter` with boundary ``"\\n\\n"`` and the summary
markers, fed the generated tokens only, the prompt excluded). The generation is::

    body_1 \\n\\n <|begin_of_summary|> v1=.. <|end_of_summary|> \\n\\n body_2 \\n\\n <summary_2> \\n\\n ... \\n\\n answer = V.. </s>

and the segmenter cuts it into ``n_steps + 1`` thoughts: thought ``i`` (``0 <= i < n_steps``) is
step ``k = i + 1``: for ``i > 0`` the blank line that follows summary ``i - 1`` (a boundary that
opens a thought, since thoughts are never empty), then step k's body, its boundary, and its
summary (markers included). Thought ``n_steps`` is the blank line after the last summary, the
answer line and EOS. ``Problem.dependencies[i]`` lists the thoughts that thought ``i`` reads; an
oracle selection zooms into them while the model writes thought ``i``, i.e. from the token
after summary ``i - 1`` closes (the query that writes thought i's opening blank line) through
thought i's own summary. Pure Python; no torch.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

__all__ = [
    "ANSWER_WORD",
    "BOUNDARY",
    "DEFAULT_N_STEPS",
    "DEFAULT_P_DETAIL",
    "LINE",
    "MAX_STEPS",
    "Problem",
    "Step",
    "SUMMARY_BEGIN",
    "SUMMARY_END",
    "Shape",
    "TASKS",
    "VALUES",
    "generate_problem",
    "generate_problems",
    "input_word",
    "label_word",
    "name",
    "parse_answer",
    "pointer_word",
    "score",
    "value_word",
    "vocabulary",
]

SUMMARY_BEGIN = "<|begin_of_summary|>"
SUMMARY_END = "<|end_of_summary|>"
BOUNDARY = "\n\n"  # ends a thought body, and follows every summary
LINE = "\n"  # separates the lines inside a thought (never two in a row)
MODULUS = 10
MAX_STEPS = 40
# The benchmark's default task sizes: about 1,040 output tokens on average (700 to 1,380), a prompt
# of about 65 tokens (about 6% of the sequence).
DEFAULT_N_STEPS = (10, 20)
DEFAULT_P_DETAIL = 0.6
MAX_WORK_LINES = 40
VALUES = tuple(f"V{i}" for i in range(MODULUS))  # plain values, in the arithmetic lines
PRIME = "'"
SEP = ";"  # separates the prompt's facts
CHECK = "check"
ANSWER_WORD = "answer"
QUERY_WORD = "find"
_WORDS = ("=", "+", "-", SEP, "?", CHECK, ANSWER_WORD, QUERY_WORD)

IntOrRange = Union[int, Tuple[int, int]]


@dataclass(frozen=True)
class Shape:
    """The proportions of a problem's text.

    work_lines: 0 writes a step's eight arithmetic lines once, unlabelled (the ``short`` task);
    ``n > 0`` writes n lines, each opened by its label word ``w1 .. wn`` and cycling through the
    eight, so a thought is about ``7.6 n + 12`` tokens and what to write next is always found in the
    few lines above. rich_summary: the summary holds the step's name, input and result
    (``v5 v5#7 v5=7``, five tokens with the markers) instead of the result alone; never the
    intermediate, and never another step's name. n_steps: the default size range.
    """

    work_lines: int = 0
    rich_summary: bool = False
    n_steps: Tuple[int, int] = DEFAULT_N_STEPS

    def __post_init__(self) -> None:
        if not 0 <= self.work_lines <= MAX_WORK_LINES:
            raise ValueError(f"work_lines={self.work_lines!r}: need 0 <= work_lines <= {MAX_WORK_LINES}")


# ``short``: thoughts of about 65 tokens, 3-token summaries, outputs of about 1,040 tokens (the
# committed ``testbed/reasoner``'s task). ``long``: the proportions of real reasoning traces,
# thoughts of about 200 tokens under 5-token summaries, outputs of 2,050 to 3,300 tokens (about
# 2,620) after a prompt of about 58 (``testbed/reasoner_long``'s task).
TASKS = {"short": Shape(), "long": Shape(work_lines=24, rich_summary=True, n_steps=(10, 16))}


def name(k: int) -> str:
    """The variable of step k (``v0`` is the starting constant)."""
    return f"v{k}"


def value_word(k: int, value: int, detail: bool = False) -> str:
    """``v5=7`` (v5 holds 7) or, for the intermediate, ``v5'=4``."""
    return f"{name(k)}{PRIME if detail else ''}={value}"


def input_word(k: int, value: int) -> str:
    """``v5#7``: step 5's input constant is 7."""
    return f"{name(k)}#{value}"


def pointer_word(k: int, j: int, detail: bool) -> str:
    """``v5<v2'`` (step 5 reads v2's intermediate) or ``v5<v2`` (v2's result)."""
    return f"{name(k)}<{name(j)}{PRIME if detail else ''}"


def label_word(i: int) -> str:
    """``w3``: the label opening a long thought's third work line."""
    return f"w{i}"


def vocabulary(max_steps: int = MAX_STEPS, *, task: str = "short") -> List[str]:
    """Every token ``task``'s text uses (special tokens such as BOS/EOS are the tokenizer's); a task
    with labelled work lines has its labels after the ``short`` task's words (so a ``short``
    tokenizer's ids are a prefix of a ``long`` one's)."""
    words = [BOUNDARY, LINE, SUMMARY_BEGIN, SUMMARY_END, *_WORDS, *VALUES]
    words += [name(k) for k in range(max_steps + 1)]
    words += [value_word(k, v) for k in range(max_steps + 1) for v in range(MODULUS)]
    words += [value_word(k, v, True) for k in range(1, max_steps + 1) for v in range(MODULUS)]
    words += [input_word(k, v) for k in range(1, max_steps + 1) for v in range(MODULUS)]
    words += [pointer_word(k, j, d) for k in range(1, max_steps + 1) for j in range(k)
              for d in (False, True) if j > 0 or not d]
    if TASKS[task].work_lines:
        words += [label_word(i) for i in range(1, MAX_WORK_LINES + 1)]
    return words


@dataclass(frozen=True)
class Step:
    """Step ``k``: ``intermediate = previous + source`` and ``result = intermediate - input``.

    source_step: j, the step read (0: the constant v0); detail: whether it reads v_j's
    intermediate (only v_j's thought holds it) rather than its result; source: that value.
    """

    k: int
    input: int
    source_step: int
    detail: bool
    previous: int
    source: int
    intermediate: int
    result: int


@dataclass(frozen=True)
class Problem:
    """One task instance.

    prompt: the text to prefill (the tokenizer adds BOS). target: everything the model should write
    (thoughts, summaries, final answer line; EOS follows it). answer: the final value token, e.g.
    ``"V9"``. thoughts[i] / summaries[i]: the body text of thought i (step i + 1), without the
    boundary, and its summary (markers included); target is, joined with single spaces, each
    ``thoughts[i], "\\n\\n", summaries[i], "\\n\\n"`` and then ``answer_line``.
    dependencies[i]: the indices of the earlier thoughts that thought i reads, ascending: thought
    i - 1 (the previous step's result) and thought j - 1 for step k = i + 1's source v_j (j >= 1;
    v0 is a prompt fact, not a thought). Thought indices are those of ZoomR's ThoughtSegmenter on
    the generated text (module doc): thought i is step i + 1, thought n_steps the answer line.
    An oracle selection zooms into dependencies[i] while thought i is written.
    detail_dependencies[i]: the subset whose thought *body* is needed (a detail read's source,
    ``[j - 1]``, else empty): no summary holds that value. Both lists have ``n_steps + 1``
    entries; the last, for the answer line, is ``[n_steps - 1]`` and ``[]``.
    """

    prompt: str
    target: str
    answer: str
    dependencies: List[List[int]]
    detail_dependencies: List[List[int]]
    thoughts: List[str]
    summaries: List[str]
    answer_line: str
    start: int
    steps: Tuple[Step, ...]
    seed: str = field(default="")

    @property
    def n_steps(self) -> int:
        return len(self.steps)


def _draw(rng: random.Random, value: IntOrRange, label: str, minimum: int, maximum: int) -> int:
    lo, hi = (value, value) if isinstance(value, int) else value
    if not minimum <= lo <= hi <= maximum:
        raise ValueError(f"{label}={value!r}: need {minimum} <= min <= max <= {maximum}")
    return rng.randint(lo, hi)


def _text(words: Sequence[str]) -> str:
    return " ".join(words)


def _sum(a: int, b: int, c: int, op: str, *prefix: str) -> List[str]:
    """One arithmetic line, ``[check] Va op Vb = Vc`` (mod 10)."""
    return [*prefix, VALUES[a], op, VALUES[b], "=", VALUES[c]]


def _work(s: Step, work_lines: int) -> List[str]:
    """The arithmetic lines of step s: the eight (two operations, six checks) once, or
    ``work_lines`` labelled lines cycling through them (each line's values are in the line above or
    in the one four lines up, so a long thought is local work)."""
    eight = [_sum(s.previous, s.source, s.intermediate, "+"),
             _sum(s.intermediate, s.source, s.previous, "-", CHECK),
             _sum(s.intermediate, s.previous, s.source, "-", CHECK),
             _sum(s.source, s.previous, s.intermediate, "+", CHECK),
             _sum(s.intermediate, s.input, s.result, "-"),
             _sum(s.result, s.input, s.intermediate, "+", CHECK),
             _sum(s.intermediate, s.result, s.input, "-", CHECK),
             _sum(s.input, s.result, s.intermediate, "+", CHECK)]
    lines = eight if not work_lines else [[label_word(i + 1), *eight[i % 8]] for i in range(work_lines)]
    words: List[str] = []
    for line in lines:
        words += [*line, LINE]
    return words


def generate_problem(
    rng: random.Random,
    *,
    n_steps: Optional[IntOrRange] = None,
    p_detail: float = DEFAULT_P_DETAIL,
    shape: Shape = TASKS["short"],
    seed_label: str = "",
) -> Problem:
    """One problem from ``rng``; see :func:`generate_problems` for the parameters."""
    n = _draw(rng, shape.n_steps if n_steps is None else n_steps, "n_steps", 1, MAX_STEPS)
    if not 0.0 <= p_detail <= 1.0:
        raise ValueError(f"p_detail={p_detail!r} must be a probability")
    start = rng.randrange(MODULUS)
    results, intermediates = [start], [None]
    steps: List[Step] = []
    for k in range(1, n + 1):
        j = rng.randrange(k)
        detail = j > 0 and rng.random() < p_detail
        source = intermediates[j] if detail else results[j]
        x = rng.randrange(MODULUS)
        intermediate = (results[k - 1] + source) % MODULUS
        result = (intermediate - x) % MODULUS
        steps.append(Step(k, x, j, detail, results[k - 1], source, intermediate, result))
        results.append(result)
        intermediates.append(intermediate)

    facts = [value_word(0, start)] + [input_word(s.k, s.input) for s in steps]
    facts += [pointer_word(s.k, s.source_step, s.detail) for s in steps]
    prompt_words: List[str] = []
    for i, fact in enumerate(facts):
        prompt_words += ([SEP] if i else []) + [fact]
    prompt_words += [LINE, QUERY_WORD, name(n), "?", LINE]

    thoughts, summaries, target_words = [], [], []
    dependencies: List[List[int]] = []
    detail_dependencies: List[List[int]] = []
    for s in steps:
        # First line: recall the previous result (the summary just above), then the step's name and
        # its two prompt facts; each token is found from the one before it (one lookup each).
        # Its last token recalls the source's result (found from the pointer just before it); the
        # next line repeats it right after a line break (a ZoomR refresh point) and, for a detail
        # read, continues with the source's intermediate, which only its thought holds.
        body = [value_word(s.k - 1, s.previous), name(s.k), input_word(s.k, s.input),
                pointer_word(s.k, s.source_step, s.detail), value_word(s.source_step, results[s.source_step]),
                LINE, value_word(s.source_step, results[s.source_step])]
        if s.detail:  # recall the gist (summary), then zoom in for the detail
            body.append(value_word(s.source_step, s.source, True))
        body += [LINE, *_work(s, shape.work_lines), value_word(s.k, s.result), LINE,
                 value_word(s.k, s.intermediate, True)]
        gist = [name(s.k), input_word(s.k, s.input)] if shape.rich_summary else []
        summary = [SUMMARY_BEGIN, *gist, value_word(s.k, s.result), SUMMARY_END]
        thoughts.append(_text(body))
        summaries.append(_text(summary))
        target_words += [*body, BOUNDARY, *summary, BOUNDARY]
        # Thought index of step k is k - 1; step 0 (v0) is the prompt's constant, not a thought.
        read = {s.k - 2, s.source_step - 1} - {-1}
        dependencies.append(sorted(read))
        detail_dependencies.append([s.source_step - 1] if s.detail else [])
    answer = VALUES[results[n]]
    answer_words = [ANSWER_WORD, "=", answer]
    target_words += answer_words
    dependencies.append([n - 1])
    detail_dependencies.append([])
    return Problem(
        prompt=_text(prompt_words), target=_text(target_words), answer=answer,
        dependencies=dependencies, detail_dependencies=detail_dependencies, thoughts=thoughts,
        summaries=summaries, answer_line=_text(answer_words), start=start, steps=tuple(steps),
        seed=seed_label,
    )


def generate_problems(
    seed: int,
    n_problems: int,
    *,
    n_steps: Optional[IntOrRange] = None,
    p_detail: float = DEFAULT_P_DETAIL,
    task: str = "short",
) -> List[Problem]:
    """``n_problems`` problems, a pure function of the arguments.

    task: a name in :data:`TASKS` (the text's proportions). n_steps: an int, or an inclusive
    ``(min, max)`` range drawn per problem (lengths vary), at most :data:`MAX_STEPS`; None: the
    task's default range. Each step reads an earlier variable drawn uniformly from ``v0 .. v_{k-1}``,
    through its intermediate (a *detail*) with probability ``p_detail`` (never for v0, which has
    none). Problem k depends only on (seed, k) and the size parameters, so a longer list starts
    with the shorter one.
    """
    if n_problems < 0:
        raise ValueError(f"n_problems must be >= 0, got {n_problems}")
    if task not in TASKS:
        raise ValueError(f"task={task!r} is not allowed; allowed: {', '.join(TASKS)}")
    problems = []
    for k in range(n_problems):
        label = f"program_trace:{seed}:{k}"
        problems.append(generate_problem(random.Random(label), n_steps=n_steps, p_detail=p_detail,
                                         shape=TASKS[task], seed_label=label))
    return problems


_ANSWER_RE = re.compile(rf"{ANSWER_WORD}\s*=\s*(V\d+)\b")


def parse_answer(generated_text: str) -> Optional[str]:
    """The value token of the first ``answer = V..`` line of a generation, or None."""
    match = _ANSWER_RE.search(generated_text)
    return match.group(1) if match else None


def score(problem: Problem, generated_text: str) -> bool:
    """Final answer exact match: the first ``answer = V..`` in the text is ``problem.answer``."""
    return parse_answer(generated_text) == problem.answer
