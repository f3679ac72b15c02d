"""A harder member of the demo's task family: chains of several multi-digit additions.

``412+387+905=`` is solved column by column, least significant digit first, exactly like
:mod:`hkd.tasks.arith`'s two-operand problems (``2+7+5+0=14 c1;`` -- each column sums one
digit of every operand plus the carry, which can now exceed 1), then ``=> 1704``. With two
operands the problems, prompts and worked solutions are identical to ``arith``'s, so the
demo's own task is the ``operands=2`` case. More operands make each column depend on more
positions of the prompt, more digits make the solutions longer. ``DemoSettings.hard()`` uses
two 3-digit operands (three were too hard for the CPU budget; see its docstring), where a
small student at a fixed step budget stays below its teacher unless it learns from the
teacher's hidden states (``bench/hard_task.py``, docs/benchmarks.md "Hard task: budget curves").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hkd.tasks.arith import ANSWER_MARK

MAX_OPERANDS = 9  # the carry of a column stays one digit (9 x 9 + 8 < 100)


@dataclass(frozen=True)
class ChainProblem:
    operands: tuple[int, ...]

    @property
    def prompt(self) -> str:
        return "+".join(str(x) for x in self.operands) + "="

    @property
    def answer(self) -> str:
        return str(sum(self.operands))

    def worked_solution(self) -> str:
        """Column-by-column sums with the carry, least significant digit first: ``7+5+9+0=21 c2;``."""
        reversed_digits = [str(x)[::-1] for x in self.operands]
        carry, steps = 0, []
        for i in range(max(len(d) for d in reversed_digits)):
            column = [int(d[i]) if i < len(d) else 0 for d in reversed_digits]
            total = sum(column) + carry
            steps.append("+".join(str(x) for x in column) + f"+{carry}={total} c{total // 10};")
            carry = total // 10
        return " ".join(steps) + f" {ANSWER_MARK}{self.answer}"

    def answer_only(self) -> str:
        return f"{ANSWER_MARK}{self.answer}"


def make_chain_problems(n: int, digits: int, operands: int, seed: int,
                        exclude: set[tuple[int, ...]] | None = None) -> list[ChainProblem]:
    """``n`` distinct problems of ``operands`` numbers with ``digits`` digits each (``exclude`` keeps splits disjoint).

    Draws the operands in the order :func:`hkd.tasks.arith.make_problems` draws its pair, so
    ``operands=2`` gives the same problems as ``make_problems`` for the same seed.
    """
    if not 2 <= operands <= MAX_OPERANDS:
        raise ValueError(f"operands must be between 2 and {MAX_OPERANDS}, got {operands}")
    if digits < 1:
        raise ValueError(f"digits must be at least 1, got {digits}")
    rng = random.Random(seed)
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    available = (high - low + 1) ** operands
    if available - len(exclude or ()) < n:
        raise ValueError(f"only {available} distinct problems of {operands} {digits}-digit numbers exist; asked for {n}")
    seen = set(exclude or ())
    out: list[ChainProblem] = []
    while len(out) < n:
        numbers = tuple(rng.randint(low, high) for _ in range(operands))
        if numbers not in seen:
            seen.add(numbers)
            out.append(ChainProblem(numbers))
    return out
