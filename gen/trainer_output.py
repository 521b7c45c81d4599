"""The emitted trainers' printed lines, parsed in one place (llmgen train, llmgen bench, the tests).

Both trainers print, on stdout:
    step 3/100 | loss 9.810153 | lr 3.00e-04 | norm 3.3296 | 1197.51 ms | 214 tok/s
    val loss 9.011058
    generating:
    ---
    <the sample: text, or token ids separated by spaces>
    ---
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NUMBER = r"[-+0-9.eEnaifNAIF]+"  # printf's %f and %e, infinities and NaNs included
STEP_LINE = re.compile(rf"^step (\d+)/(\d+) \| loss ({_NUMBER}) \| lr ({_NUMBER}) \| norm ({_NUMBER}) \| "
                       rf"({_NUMBER}) ms \| ({_NUMBER}) tok/s$")
VAL_LINE = re.compile(rf"^val loss ({_NUMBER})$")


@dataclass(frozen=True)
class Step:
    step: int       # 1-based
    steps: int
    loss: float
    lr: float
    norm: float
    ms: float
    tok_s: float


def parse_step(line: str) -> Step | None:
    """The fields of a step line, or None for any other line."""
    m = STEP_LINE.match(line.rstrip("\n"))
    if m is None:
        return None
    return Step(int(m.group(1)), int(m.group(2)), *(float(m.group(i)) for i in range(3, 8)))


def parse_val(line: str) -> float | None:
    """The loss of a `val loss X` line, or None for any other line."""
    m = VAL_LINE.match(line.rstrip("\n"))
    return float(m.group(1)) if m else None


def steps(stdout: str) -> dict[int, Step]:
    """Every step line of a run's output, by step."""
    return {s.step: s for s in map(parse_step, stdout.splitlines()) if s is not None}


def samples(stdout: str) -> list[str]:
    """The text of each sample block (`generating:`, `---`, the sample, `---`), in order."""
    out, lines, i = [], stdout.splitlines(), 0
    while i < len(lines):
        if lines[i] == "generating:" and i + 1 < len(lines) and lines[i + 1] == "---":
            end = lines.index("---", i + 2) if "---" in lines[i + 2:] else len(lines)
            out.append("\n".join(lines[i + 2:end]))
            i = end + 1
        else:
            i += 1
    return out
