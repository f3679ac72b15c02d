"""A synthetic multi-step reasoning task: multi-digit addition with worked solutions.

Stands in for a real reasoning dataset in tests and the demo: problems are generated from a
seed, a worked solution spells out each column with its carry, and the final answer is the
text after ``=> ``, so a verifier can check any completion exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ANSWER_MARK = "=> "


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)

    def worked_solution(self) -> str:
        """Column-by-column addition, least significant digit first: ``7+5+0=12 c1;``."""
        xs, ys = str(self.a)[::-1], str(self.b)[::-1]
        carry, steps = 0, []
        for i in range(max(len(xs), len(ys))):
            x = int(xs[i]) if i < len(xs) else 0
            y = int(ys[i]) if i < len(ys) else 0
            total = x + y + carry
            steps.append(f"{x}+{y}+{carry}={total} c{total // 10};")
            carry = total // 10
        return " ".join(steps) + f" {ANSWER_MARK}{self.answer}"

    def answer_only(self) -> str:
        return f"{ANSWER_MARK}{self.answer}"


def make_problems(n: int, digits: int, seed: int, exclude: set[tuple[int, int]] | None = None) -> list[Problem]:
    """``n`` distinct problems with ``digits``-digit operands (``exclude`` keeps splits disjoint)."""
    rng = random.Random(seed)
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    if (high - low + 1) ** 2 - len(exclude or ()) < n:
        raise ValueError(f"only {(high - low + 1) ** 2} distinct {digits}-digit problems exist; asked for {n}")
    seen = set(exclude or ())
    out: list[Problem] = []
    while len(out) < n:
        pair = (rng.randint(low, high), rng.randint(low, high))
        if pair not in seen:
            seen.add(pair)
            out.append(Problem(*pair))
    return out


def extract_answer(completion: str) -> str | None:
    """The text after the last ``=> `` up to the end of its line, or None."""
    if ANSWER_MARK not in completion:
        return None
    return completion.rsplit(ANSWER_MARK, 1)[1].split("\n", 1)[0].strip()
