"""`llmgen report`: plots and figures of training runs, from the trainer's main.log.

The log (llm.c's format) has one line per event, of space-separated key:value fields:

    s:0 tel:10.8256                                      a val line: the val loss at step 0
    s:0 trl:10.8353 lr:0.000100 norm:4.17                a train line
    s:12 trl:5.4321 lr:1.0e-03 norm:1.23 ms:162.78 tok_s:3145 tokens:6656

s is the step (from 0: a train line's loss is that of step s's batch, measured before the
step's update, and a val line at s is measured after s updates, so both describe the model
after s steps), tel the val loss, trl the train loss, lr the learning rate, norm the gradient
norm, ms the step's time in milliseconds, tok_s its tokens per second, and tokens the tokens
trained so far including this step (a whole number). Every line needs s; any other subset of the keys may be
there (old llmgen logs and llm.c's own have neither ms, tok_s nor tokens); keys not listed
here (such as llm.c's eval:) are ignored, and a line with neither trl nor tel says nothing
to the report. Blank lines are skipped. A line that is not key:value fields, or has no s, or
a value of a known key that is not a number, is an error naming the file and line, except
the last line when it does not end in a newline: a run killed while writing leaves that, so
it is dropped (even when it reads as fields, since its last number may be cut short) and
the report notes it. A resumed run appends to the log and may repeat steps: for each step
the last train line (and the last val line) wins.

The report of one or more runs is report.png and report.html, written (each atomically)
into the first run dir, or -o OUT_DIR. The PNG is WIDTH_PX x
HEIGHT_PX = 1200 x 900 pixels (a 12 x 9 inch figure at 100 dpi), six panels: train (solid)
and val (dashed, dots) loss against step; the same against tokens trained (each loss at the
tokens the model had trained on when it was measured: the tokens of step s-1, 0 at step 0,
interpolated where a step's line is missing), or a note that the log has no token counts;
learning rate, gradient norm, tok/s and ms per step against step. --log-scale makes the two
loss axes logarithmic. Several runs are overlaid, one colour per run, labelled by their
dirs' names (with parent dirs where two names are the same).

The HTML is self-contained: a table of figures per run (steps trained, i.e. the last train
step + 1; final train loss; best and final val loss with their steps; median ms/step and
tok/s and the total tokens, where the log has them), notes on what was tolerated, and the
PNG, embedded as a base64 data: URI.

matplotlib is an optional extra (pip install "llmgen[report]"), imported only when a report
is drawn, with the Agg backend and no pyplot.
"""

from __future__ import annotations

import base64
import bisect
import html
import io
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from .errors import LlmgenError
from .fileio import write_atomic

LOG_FILE = "main.log"
HTML_FILE, PNG_FILE = "report.html", "report.png"
DPI = 100
WIDTH_PX, HEIGHT_PX = 1200, 900
INSTALL_HINT = 'pip install "llmgen[report]"'
NEED_MATPLOTLIB = f"llmgen report needs matplotlib: {INSTALL_HINT}"


def _count(value: str) -> int:
    """A whole number, also when written as one (6656, 6656.0 or 6.656e3)."""
    v = float(value)
    if not v.is_integer():
        raise ValueError(f"{value} is not a whole number")
    return int(v)


# the keys the report reads, and how their values parse; any other key is ignored
KEYS = {"s": int, "trl": float, "tel": float, "lr": float, "norm": float, "ms": float, "tok_s": float, "tokens": _count}
TRAIN_KEYS = ("trl", "lr", "norm", "ms", "tok_s", "tokens")  # the fields a train line carries
FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):(\S+)$")


@dataclass
class RunLog:
    """A parsed main.log. train: step -> the fields of its (last) train line, trl always
    among them; val: step -> its (last) val loss; notes: what was tolerated."""
    path: Path
    train: dict[int, dict[str, float]]
    val: dict[int, float]
    notes: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a train-line key, by step, where the lines have it."""
        steps = [s for s in sorted(self.train) if key in self.train[s]]
        return steps, [self.train[s][key] for s in steps]

    def val_series(self) -> tuple[list[int], list[float]]:
        steps = sorted(self.val)
        return steps, [self.val[s] for s in steps]

    def has(self, key: str) -> bool:
        return any(key in f for f in self.train.values())

    def tokens_before(self, steps: list[int]) -> list[float | None]:
        """The tokens trained before step s (what a loss logged at s was measured after), for
        each s: the tokens of step s-1's line, 0 for s = 0, interpolated between known steps,
        None past the last known one or when the log has no token counts."""
        known = {0: 0}
        known.update({s + 1: f["tokens"] for s, f in self.train.items() if "tokens" in f})
        if len(known) == 1:
            return [None] * len(steps)
        xs = sorted(known)
        out: list[float | None] = []
        for s in steps:
            if s in known:
                out.append(float(known[s]))
            elif s < 0 or s > xs[-1]:
                out.append(None)
            else:
                i = bisect.bisect(xs, s)         # xs[i-1] < s < xs[i]
                x0, x1 = xs[i - 1], xs[i]
                out.append(known[x0] + (known[x1] - known[x0]) * (s - x0) / (x1 - x0))
        return out


def _number(key: str, value: str) -> float:
    v = KEYS[key](value)
    if key in ("s", "tokens") and v < 0:
        raise ValueError(f"{key} must not be negative")
    return v



def parse(text: str, source: str | Path = LOG_FILE) -> RunLog:
    """Parse a log's text (see the module docstring); source names it in errors."""
    lines = text.split("\n")
    notes = []
    if lines[-1] == "":
        lines.pop()                              # the text ended with a newline, as it should
    elif lines[-1].strip():
        notes.append(f"{source}: ignored the unfinished last line {len(lines)} ({lines[-1].strip()[:80]!r})")
        lines.pop()
    train: dict[int, dict[str, float]] = {}
    val: dict[int, float] = {}
    for n, line in enumerate(lines, 1):
        tokens = line.split()
        if not tokens:
            continue
        fields: dict[str, float] = {}
        try:
            for token in tokens:
                m = FIELD.match(token)
                if m is None:
                    raise ValueError(f"{token[:40]!r} is not a key:value field")
                key, value = m.groups()
                if key in KEYS:
                    fields[key] = _number(key, value)
            if "s" not in fields:
                raise ValueError("no step (s:N)")
        except ValueError as e:
            raise LlmgenError(f"{source}: line {n} is not a log line like 's:12 trl:5.43 lr:0.001' "
                              f"({e}): {line.strip()[:80]!r}") from None
        step = fields["s"]
        if "trl" in fields:
            train[step] = {k: fields[k] for k in TRAIN_KEYS if k in fields}
        if "tel" in fields:
            val[step] = fields["tel"]
    if not train:
        what = f"only val lines ({len(val)})" if val else "no train or val lines"
        if notes:
            what += ", and an unfinished last line, ignored"
        raise LlmgenError(f"{source}: no train lines (s:STEP trl:LOSS ...) in the log: {what}")
    return RunLog(Path(source), train, val, notes)


def read_run(run_dir: str | Path) -> RunLog:
    """Parse RUN_DIR/main.log, with one clear error for a missing dir, a missing, unreadable,
    empty or binary log, or a bad line."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise LlmgenError(f"{run_dir}: no such run dir")
    if not run_dir.is_dir():
        raise LlmgenError(f"{run_dir}: not a dir (expected a run dir with {LOG_FILE}, the trainer's -o)")
    path = run_dir / LOG_FILE
    if not path.is_file():
        raise LlmgenError(f"{path}: no such log (is {run_dir} a trainer's -o dir?)")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LlmgenError(f"{path}: cannot read the log ({e.strerror})") from None
    if not data.strip():
        raise LlmgenError(f"{path}: the log is empty")
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1, "NUL byte")
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LlmgenError(f"{path}: not a text log (binary data at byte {e.start})") from None
    return parse(text, path)


# ---- figures -----------------------------------------------------------------------------
@dataclass
class Summary:
    name: str
    steps: int                                  # the last train step + 1
    final_train_loss: float
    best_val: tuple[float, int] | None          # (loss, step)
    final_val: tuple[float, int] | None
    median_ms: float | None
    median_tok_s: float | None
    tokens: int | None                          # at the last train line that has them


def _median(values) -> float | None:
    values = [v for v in values if math.isfinite(v)]
    return statistics.median(values) if values else None


def summarize(log: RunLog, name: str) -> Summary:
    last = max(log.train)
    vals = [(v, s) for s, v in sorted(log.val.items()) if math.isfinite(v)]
    tokens = log.series("tokens")[1]
    return Summary(name=name, steps=last + 1, final_train_loss=log.train[last]["trl"],
                   best_val=min(vals) if vals else None,
                   final_val=(log.val[max(log.val)], max(log.val)) if log.val else None,
                   median_ms=_median(log.series("ms")[1]), median_tok_s=_median(log.series("tok_s")[1]),
                   tokens=int(tokens[-1]) if tokens else None)


def _loss(x: tuple[float, int] | None) -> str:
    return "–" if x is None else f"{x[0]:.4f} (step {x[1]})"


def summary_line(s: Summary) -> str:
    """One line of a run's figures, for the terminal."""
    parts = [f"{s.steps} steps", f"final train loss {s.final_train_loss:.4f}"]
    if s.final_val is not None:
        parts.append(f"val loss best {_loss(s.best_val)}, final {_loss(s.final_val)}")
    if s.median_ms is not None:
        parts.append(f"median {s.median_ms:.2f} ms/step")
    if s.median_tok_s is not None:
        parts.append(f"{s.median_tok_s:,.0f} tok/s")
    if s.tokens is not None:
        parts.append(f"{s.tokens:,} tokens")
    return f"{s.name}: " + ", ".join(parts)


# ---- drawing -----------------------------------------------------------------------------
def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter, LogFormatter, MaxNLocator
    except ImportError:
        raise LlmgenError(NEED_MATPLOTLIB) from None
    return SimpleNamespace(Figure=Figure, FigureCanvasAgg=FigureCanvasAgg, EngFormatter=EngFormatter,
                           LogFormatter=LogFormatter, MaxNLocator=MaxNLocator)


def labels_for(run_dirs) -> list[str]:
    """The dirs' names, with as many parent dirs as it takes to tell them apart (a/run, b/run)."""
    paths = [Path(d).resolve().parts for d in run_dirs]
    labels = []
    for p in paths:
        n = 1
        while n < len(p) and sum(q[-n:] == p[-n:] for q in paths) > 1:
            n += 1
        labels.append(str(Path(*p[-n:])))
    return labels


def _lone(xs) -> str | None:
    return "." if len(xs) == 1 else None        # a line through one point would not show


def render_png(logs: list[RunLog], labels: list[str], *, log_scale: bool = False) -> bytes:
    """The plots of the runs as PNG bytes, WIDTH_PX x HEIGHT_PX."""
    mpl = _matplotlib()
    fig = mpl.Figure(figsize=(WIDTH_PX / DPI, HEIGHT_PX / DPI), dpi=DPI, layout="constrained")
    mpl.FigureCanvasAgg(fig)
    (by_step, by_tokens), (lr, norm), (tok_s, ms) = fig.subplots(3, 2)
    several = len(logs) > 1
    title = "llmgen report: " + ", ".join(labels)
    fig.suptitle(title if len(title) <= 100 else f"llmgen report: {len(labels)} runs")

    missing: dict[str, list[str]] = {}          # key -> runs without it
    for i, (log, label) in enumerate(zip(logs, labels)):
        color = f"C{i % 10}"
        prefix = f"{label} " if several else ""
        steps, trl = log.series("trl")
        vsteps, tel = log.val_series()
        by_step.plot(steps, trl, color=color, lw=1, marker=_lone(steps), label=f"{prefix}train")
        if vsteps:
            by_step.plot(vsteps, tel, color=color, ls="--", marker="o", ms=4, label=f"{prefix}val")
        if log.has("tokens"):
            for xs, ys, style in ((steps, trl, dict(lw=1, marker=_lone(steps))),
                                  (vsteps, tel, dict(ls="--", marker="o", ms=4))):
                pts = [(x, y) for x, y in zip(log.tokens_before(xs), ys) if x is not None]
                if pts:
                    by_tokens.plot(*zip(*pts), color=color, **style)
        else:
            missing.setdefault("tokens", []).append(label)
        for ax, key in ((lr, "lr"), (norm, "norm"), (tok_s, "tok_s"), (ms, "ms")):
            if log.has(key):
                xs, ys = log.series(key)
                ax.plot(xs, ys, color=color, lw=1, marker=_lone(xs))
            else:
                missing.setdefault(key, []).append(label)

    what = {"tokens": "token counts", "lr": "learning rates", "norm": "gradient norms", "tok_s": "tok/s",
            "ms": "step times"}
    panels = ((by_step, None, "loss", "step", "loss"),
              (by_tokens, "tokens", "loss against tokens", "tokens trained", "loss"),
              (lr, "lr", "learning rate", "step", "lr"), (norm, "norm", "gradient norm", "step", "norm"),
              (tok_s, "tok_s", "throughput", "step", "tok/s"), (ms, "ms", "step time", "step", "ms"))
    for ax, key, title, xlabel, ylabel in panels:
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if xlabel == "step":
            ax.xaxis.set_major_locator(mpl.MaxNLocator(integer=True))
        absent = missing.get(key, [])
        if key is not None and len(absent) == len(logs):
            ax.text(0.5, 0.5, f"no {what[key]} in {'these logs' if several else 'this log'}", transform=ax.transAxes,
                    ha="center", va="center", color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
        elif absent:
            ax.text(0.01, 0.01, f"no {what[key]}: {', '.join(absent)}", transform=ax.transAxes, ha="left",
                    va="bottom", color="0.4", fontsize="small")
    if log_scale:
        for ax in (by_step, by_tokens) if len(missing.get("tokens", [])) < len(logs) else (by_step,):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(mpl.LogFormatter(labelOnlyBase=False))  # 5, 6, not 5x10^0
            ax.yaxis.set_minor_formatter(mpl.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
    by_tokens.xaxis.set_major_formatter(mpl.EngFormatter())
    tok_s.yaxis.set_major_formatter(mpl.EngFormatter())
    by_step.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    return buf.getvalue()


def render_html(summaries: list[Summary], paths: list[Path], png: bytes, notes: list[str]) -> str:
    cols = [("run", lambda s: s.name), ("steps", lambda s: f"{s.steps:,}"),
            ("final train loss", lambda s: f"{s.final_train_loss:.4f}"),
            ("best val loss", lambda s: _loss(s.best_val)), ("final val loss", lambda s: _loss(s.final_val))]
    optional = [("median ms/step", "median_ms", "{:.2f}"), ("median tok/s", "median_tok_s", "{:,.0f}"),
                ("tokens", "tokens", "{:,}")]
    for title, attr, fmt in optional:
        if any(getattr(s, attr) is not None for s in summaries):
            cols.append((title, lambda s, a=attr, f=fmt: "–" if getattr(s, a) is None else f.format(getattr(s, a))))
    esc = html.escape
    head = "".join(f"<th>{esc(t)}</th>" for t, _ in cols)
    rows = "\n".join("<tr>" + "".join(f"<td>{esc(fn(s))}</td>" for _, fn in cols) + "</tr>" for s in summaries)
    logs = "".join(f"<li><code>{esc(str(p))}</code></li>" for p in paths)
    notes_html = "".join(f"<li>{esc(n)}</li>" for n in notes)
    title = "llmgen report: " + ", ".join(s.name for s in summaries)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{esc(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ padding: 4px 12px; border-bottom: 1px solid #ccc; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
</style>
</head>
<body>
<h1>{esc(title)}</h1>
<p>From the logs:</p>
<ul>{logs}</ul>
<table>
<tr>{head}</tr>
{rows}
</table>
{f"<p>Notes:</p><ul>{notes_html}</ul>" if notes else ""}
<img src="data:image/png;base64,{base64.b64encode(png).decode('ascii')}" width="{WIDTH_PX}" height="{HEIGHT_PX}"
     alt="loss, learning rate, gradient norm and speed of {esc(', '.join(s.name for s in summaries))}">
</body>
</html>
"""


@dataclass
class Report:
    html: Path
    png: Path
    summaries: list[Summary]
    notes: list[str]


def write_report(run_dirs, out_dir: str | Path | None = None, *, log_scale: bool = False) -> Report:
    """Read each RUN_DIR/main.log and write report.png and report.html into out_dir, by
    default the first run dir."""
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise LlmgenError("no run dirs to report on")
    _matplotlib()                               # a missing matplotlib is said first
    logs = [read_run(d) for d in run_dirs]
    labels = labels_for(run_dirs)
    summaries = [summarize(log, label) for log, label in zip(logs, labels)]
    notes = [n for log in logs for n in log.notes]
    png = render_png(logs, labels, log_scale=log_scale)
    out = Path(out_dir) if out_dir is not None else run_dirs[0]
    page = render_html(summaries, [log.path.resolve() for log in logs], png, notes)
    write_atomic(out / PNG_FILE, [png])
    write_atomic(out / HTML_FILE, [page.encode("utf-8")])
    return Report(html=out / HTML_FILE, png=out / PNG_FILE, summaries=summaries, notes=notes)
