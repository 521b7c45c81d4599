"""The layout pass over every emitted file, so that templates never align anything by hand.

For C and CUDA:
- trailing whitespace is trimmed and runs of blank lines become one;
- trailing `//` comments on consecutive lines are aligned to one column (a table of struct
  fields, #defines or a function's argument shapes reads as a table), unless that would push
  them past COMMENT_COLUMN_LIMIT: then the run is left as written;
- a line longer than WRAP_COLUMN that is only a comma-separated list (a pointer table) is
  wrapped at its commas, each line indented as the first.
For Makefiles only the first rule applies. The pass is deterministic and idempotent.
"""

from __future__ import annotations

import re

WRAP_COLUMN = 100
COMMENT_COLUMN_LIMIT = 110
# a line that is only a list: `&p->wte, &p->wpe, ...` or `(void**)&p->wte, ...`
_LIST_LINE = re.compile(r"^(\s*)([^\s\"{};/][^\"{};/]*,[^\"{};/]*)$")


def _comment_start(line: str) -> int:
    """Index of a `//` comment outside string and character literals, or -1."""
    quote = None
    i = 0
    while i < len(line) - 1:
        c = line[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c == "/" and line[i + 1] == "/":
            return i
        i += 1
    return -1


def _split_trailing(line: str) -> tuple[str, str] | None:
    """(code, comment) for a line with code and then a `//` comment; None otherwise."""
    at = _comment_start(line)
    if at <= 0 or not line[:at].strip():
        return None
    return line[:at].rstrip(), line[at:]


def _basic(text: str) -> list[str]:
    lines, blank = [], False
    for line in text.split("\n"):
        line = line.rstrip()
        if not line:
            if blank:
                continue
            blank = True
        else:
            blank = False
        lines.append(line)
    return lines


def _split_top_level(text: str) -> list[str] | None:
    """The comma-separated items of text (commas inside parentheses do not split), or None
    if an item holds a call or an expression rather than a name (a space inside it)."""
    items, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "(") - (c == ")")
        if c == "," and depth == 0:
            items.append(text[start:i].strip())
            start = i + 1
    items.append(text[start:].strip())
    if any(" " in item for item in items):
        return None
    return items


def _wrap(line: str) -> list[str]:
    m = _LIST_LINE.match(line)
    if len(line) <= WRAP_COLUMN or m is None:
        return [line]
    indent, items = m.group(1), _split_top_level(m.group(2))
    if items is None:
        return [line]
    trailing = items[-1] == ""
    items = [s for s in items if s]
    out, current = [], indent
    for j, item in enumerate(items):
        piece = item + ("," if j < len(items) - 1 or trailing else "")
        if current.strip() and len(current) + 1 + len(piece) > WRAP_COLUMN:
            out.append(current)
            current = indent
        current += (" " if current.strip() else "") + piece
    out.append(current)
    return out


def _align(lines: list[str]) -> list[str]:
    out, i = [], 0
    while i < len(lines):
        run = []
        while i + len(run) < len(lines) and (parts := _split_trailing(lines[i + len(run)])) is not None:
            run.append(parts)
        if len(run) < 2:
            out.append(lines[i])
            i += 1
            continue
        column = max(len(code) for code, _ in run) + 1
        if column + 2 > COMMENT_COLUMN_LIMIT:
            out.extend(lines[i:i + len(run)])
        else:
            out.extend(code.ljust(column) + comment for code, comment in run)
        i += len(run)
    return out


def format_c(text: str) -> str:
    lines = []
    for line in _basic(text):
        lines.extend(_wrap(line))
    return "\n".join(_align(lines))


def format_make(text: str) -> str:
    return "\n".join(_basic(text))
