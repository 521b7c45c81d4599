"""`llmgen report`: main.log parsing, the PNG and HTML of real runs, and clear errors."""

import base64
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import MICRO, run_trainer
from llmgen import report
from llmgen.cli import cli
from llmgen.errors import LlmgenError

OLD = """s:0 tel:10.8256
s:0 trl:10.8353 lr:0.000100 norm:4.17
s:1 trl:10.2 lr:0.000200 norm:3.1
s:2 trl:9.5 lr:0.000300 norm:2.5
s:2 tel:9.9
"""
NEW = """s:0 tel:4.2
s:0 trl:4.25 lr:1.000000e-03 norm:1.5 ms:200.0 tok_s:2560 tokens:512
s:1 trl:4.0 lr:1.000000e-03 norm:1.2345 ms:162.78 tok_s:3145 tokens:1024 future:7 other:x
s:2 trl:3.5 lr:9.000000e-04 norm:1.0 ms:170.0 tok_s:3011 tokens:1536
s:3 tel:3.4
"""
LLMC = """s:0 tel:11.0
s:0 trl:11.012345 lr:0.000006 norm:15.23
s:1 trl:10.500000 lr:0.000012 norm:9.10
s:1 eval:0.2500
"""


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk, checking the signature and the chunk's CRC."""
    import zlib
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    (crc,) = struct.unpack(">I", data[16 + length:20 + length])
    assert crc == zlib.crc32(data[12:16 + length])
    return struct.unpack(">II", data[16:24])


def write_log(run_dir, text):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "main.log").write_text(text)
    return run_dir


def cli_report(*args):
    return CliRunner().invoke(cli, ["report", *map(str, args)])


# ---- parsing -----------------------------------------------------------------------------
def test_parse_old_format():
    log = report.parse(OLD)
    assert log.series("trl") == ([0, 1, 2], [10.8353, 10.2, 9.5])
    assert log.series("norm") == ([0, 1, 2], [4.17, 3.1, 2.5])
    assert log.val_series() == ([0, 2], [10.8256, 9.9])
    assert not log.has("tokens") and not log.has("ms") and log.notes == []
    assert log.tokens_before([0, 1]) == [None, None]
    s = report.summarize(log, "old")
    assert (s.steps, s.final_train_loss, s.best_val, s.final_val) == (3, 9.5, (9.9, 2), (9.9, 2))
    assert s.median_ms is s.median_tok_s is s.tokens is None


def test_parse_new_format_ignores_unknown_keys():
    log = report.parse(NEW)
    assert log.series("lr") == ([0, 1, 2], [1e-3, 1e-3, 9e-4])
    assert log.series("tokens") == ([0, 1, 2], [512, 1024, 1536])
    assert log.series("ms")[1] == [200.0, 162.78, 170.0]
    assert log.train[1] == {"trl": 4.0, "lr": 1e-3, "norm": 1.2345, "ms": 162.78, "tok_s": 3145, "tokens": 1024}
    # a loss at step s was measured after the tokens of steps 0..s-1; val at 3 after step 2's
    assert log.tokens_before([0, 1, 2, 3, 4]) == [0, 512, 1024, 1536, None]
    s = report.summarize(log, "new")
    assert (s.steps, s.final_train_loss, s.best_val, s.final_val) == (3, 3.5, (3.4, 3), (3.4, 3))
    assert (s.median_ms, s.median_tok_s, s.tokens) == (170.0, 3011, 1536)
    line = report.summary_line(s)
    assert "3 steps" in line and "median 170.00 ms/step" in line and "1,536 tokens" in line


def test_parse_llmc_format():
    log = report.parse(LLMC)
    assert log.series("trl") == ([0, 1], [11.012345, 10.5])
    assert log.val_series() == ([0], [11.0])          # eval: (HellaSwag) is not a val loss


def test_tokens_interpolated_between_logged_steps():
    log = report.parse("s:0 trl:2 tokens:100\ns:1 trl:2\ns:2 trl:2\ns:3 trl:2 tokens:4e2\n")
    assert log.series("tokens") == ([0, 3], [100, 400]) and isinstance(log.train[3]["tokens"], int)
    assert log.tokens_before([0, 1, 2, 3, 4, 5]) == [0, 100, 200, 300, 400, None]


def test_resumed_run_later_lines_win():
    resumed = OLD + "s:1 tel:10.0\ns:1 trl:10.3 lr:0.000200 norm:3.0\ns:2 trl:9.4 lr:0.000300 norm:2.4\ns:3 tel:9.0\n"
    log = report.parse(resumed)
    assert log.series("trl") == ([0, 1, 2], [10.8353, 10.3, 9.4])
    assert log.series("norm")[1] == [4.17, 3.0, 2.4]
    assert log.val_series() == ([0, 1, 2, 3], [10.8256, 10.0, 9.9, 9.0])


def test_truncated_last_line_is_dropped_with_a_note():
    # a run killed mid-write: no newline at the end; the cut line is dropped even when it
    # parses, since its last number may be cut short (tokens:15 of tokens:1536)
    for cut in ["s:3 trl:3.", "s:3 trl:3.2 lr:9.0e-04 norm:1.0 ms:170.0 tok_s:3011 tokens:15", "s:3 t", "s"]:
        log = report.parse(NEW.replace("s:3 tel:3.4\n", cut), "run/main.log")
        assert log.series("trl")[0] == [0, 1, 2] and log.val == {0: 4.2}
        assert log.notes == [f"run/main.log: ignored the unfinished last line 5 ({cut!r})"]
    assert report.parse(OLD + "\n\n").notes == []             # blank lines are fine


@pytest.mark.parametrize("bad", ["garbage here", "trl:1.0 lr:0.1", "s:x trl:1.0", "s:1 trl:abc", "s:1.5 trl:2",
                                 "s:-1 trl:2", "s:1 trl:2 tokens:1.5", "s:1 trl: 2", "s:1 :2", "step 1/10 | loss 2.0"])
def test_garbage_line_is_an_error_naming_file_and_line(bad):
    with pytest.raises(LlmgenError, match=r"^run/main.log: line 3 is not a log line like 's:12 trl:5.43") as e:
        report.parse(OLD.replace("s:1 trl:10.2 lr:0.000200 norm:3.1", bad), "run/main.log")
    assert bad.strip()[:20] in str(e.value)


def test_a_log_without_train_lines_is_an_error():
    with pytest.raises(LlmgenError, match=r"main.log: no train lines .*only val lines \(2\)"):
        report.parse("s:0 tel:1.0\ns:5 tel:0.5\n")
    with pytest.raises(LlmgenError, match="no train or val lines"):
        report.parse("s:0 eval:0.25\n")
    with pytest.raises(LlmgenError, match="no train or val lines, and an unfinished last line, ignored"):
        report.parse("s:0 trl:1.5")


# ---- reports of real runs ----------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tiny_trainer, tiny_data, tmp_path_factory):
    """Two real 30-step runs of the test-tiny trainer, with different learning rates."""
    root = tmp_path_factory.mktemp("runs")
    for name, lr in (("base", "3e-4"), ("edited", "1e-3")):
        run_trainer(tiny_trainer, "-i", tiny_data / "train_*.bin", "-j", tiny_data / "val_*.bin", "-b", 4, "-t", 16,
                    "-x", 30, "-v", 10, "-s", 0, "-l", lr, "-o", root / name)
    return root


def test_report_of_a_real_run(runs):
    run = runs / "base"
    r = cli_report(run)
    assert r.exit_code == 0, r.output
    assert r.output.splitlines() == [
        r.output.splitlines()[0], f"wrote {run / 'report.html'} and {run / 'report.png'}"]
    assert r.output.startswith("base: 30 steps, final train loss ") and "final " in r.output
    png = (run / "report.png").read_bytes()
    assert png_size(png) == (report.WIDTH_PX, report.HEIGHT_PX) == (1200, 900)
    page = (run / "report.html").read_text()
    assert f'src="data:image/png;base64,{base64.b64encode(png).decode()}"' in page
    assert page.startswith("<!DOCTYPE html>") and "<td>base</td><td>30</td>" in page
    assert "tokens" in page.split("<table>")[1].split("</table>")[0]   # the trainer logs its token counts
    log = report.read_run(run)
    assert log.series("trl")[0] == list(range(30)) and sorted(log.val) == [0, 10, 20, 30]
    assert all(math.isfinite(v) for v in log.series("trl")[1])
    # --log-scale draws other pixels, same size
    r = cli_report(run, "--log-scale", "-o", runs / "log")
    assert r.exit_code == 0, r.output
    log_png = (runs / "log/report.png").read_bytes()
    assert png_size(log_png) == (1200, 900) and log_png != png


def test_two_runs_overlaid_in_one_report(runs, tmp_path):
    r = cli_report(runs / "base", runs / "edited")
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    assert lines[0].startswith("base: 30 steps") and lines[1].startswith("edited: 30 steps")
    assert not (runs / "edited/report.html").exists()             # written into the first dir
    png = (runs / "base/report.png").read_bytes()
    page = (runs / "base/report.html").read_text()
    assert png_size(png) == (1200, 900) and base64.b64encode(png).decode() in page
    assert "<td>base</td>" in page and "<td>edited</td>" in page
    assert str(runs / "edited" / "main.log") in page
    # -o elsewhere; dirs with the same name are told apart by their parents; new-format logs
    for d in ("a/run", "b/run"):
        write_log(tmp_path / d, NEW)
    r = cli_report(tmp_path / "a/run", tmp_path / "b/run", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    page = (tmp_path / "out/report.html").read_text()
    assert "<td>a/run</td>" in page and "<td>b/run</td>" in page
    assert "<th>median tok/s</th>" in page and "<td>1,536</td>" in page
    assert png_size((tmp_path / "out/report.png").read_bytes()) == (1200, 900)


def test_truncated_log_reports_with_a_note(tmp_path):
    run = write_log(tmp_path / "run", OLD + "s:3 trl:9.")
    r = cli_report(run)
    assert r.exit_code == 0, r.output
    assert r.output.startswith(f"note: {run / 'main.log'}: ignored the unfinished last line 6 ('s:3 trl:9.')\n")
    assert "ignored the unfinished last line 6" in (run / "report.html").read_text()


# ---- errors ------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    write_log(tmp_path / "blank", "\n \n")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary/main.log").write_bytes(b"s:0 trl:1.0\n\x00\x01\x02\xff")
    (tmp_path / "latin1").mkdir()
    (tmp_path / "latin1/main.log").write_bytes(b"s:0 trl:1.0\ns:1 trl:0.9 caf\xe9:1\n")
    write_log(tmp_path / "val_only", "s:0 tel:3.0\n")
    write_log(tmp_path / "garbage", OLD.replace("s:1 trl", "s:1 oops trl"))
    (tmp_path / "file").write_text("x")
    cases = {
        tmp_path / "missing": f"{tmp_path / 'missing'}: no such run dir",
        tmp_path / "file": f"{tmp_path / 'file'}: not a dir",
        tmp_path / "empty": f"{tmp_path / 'empty/main.log'}: no such log",
        tmp_path / "blank": f"{tmp_path / 'blank/main.log'}: the log is empty",
        tmp_path / "binary": f"{tmp_path / 'binary/main.log'}: not a text log (binary data at byte 12)",
        tmp_path / "latin1": f"{tmp_path / 'latin1/main.log'}: not a text log (binary data at byte 27)",
        tmp_path / "val_only": f"{tmp_path / 'val_only/main.log'}: no train lines",
        tmp_path / "garbage": f"{tmp_path / 'garbage/main.log'}: line 3 is not a log line",
    }
    for run_dir, message in cases.items():
        r = CliRunner().invoke(cli, ["report", str(run_dir)])
        assert r.exit_code == 1, (run_dir, r.output)
        assert r.output.startswith(f"error: {message}") and r.output.count("\n") == 1, r.output
        assert not (run_dir / "report.html").exists() if run_dir.is_dir() else True
    # one bad dir among good ones fails the whole report, before anything is written
    good = write_log(tmp_path / "good", OLD)
    r = CliRunner().invoke(cli, ["report", str(good), str(tmp_path / "missing")])
    assert r.exit_code == 1 and not (good / "report.png").exists()
    assert CliRunner().invoke(cli, ["report"]).exit_code == 2       # RUN_DIR... is required


def test_without_matplotlib_one_line_and_exit_1(tmp_path):
    run = write_log(tmp_path / "run", OLD)
    code = ("import sys; sys.modules['matplotlib'] = None; from llmgen.cli import main; "
            f"sys.argv = ['llmgen', 'report', {str(run)!r}]; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == 'error: llmgen report needs matplotlib: pip install "llmgen[report]"\n'
    assert r.stdout == "" and not (run / "report.png").exists()
    code = "import sys; sys.modules['matplotlib'] = None; from llmgen import report; print(report.have_matplotlib())"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout == "False\n"


def test_labels_tell_runs_apart(tmp_path):
    assert report.labels_for([tmp_path / "a/run", tmp_path / "b/run", tmp_path / "c"]) == ["a/run", "b/run", "c"]
    assert report.labels_for([tmp_path / "x/a/run", tmp_path / "y/a/run"]) == ["x/a/run", "y/a/run"]
    assert report.labels_for(["."]) == [Path.cwd().name]


def test_train_writes_the_report_of_its_run(tmp_path):
    from llmgen import spec as specs
    from llmgen.run import train
    from llmgen.tokenizer import data_file
    (tmp_path / "micro.toml").write_text(MICRO)
    (tmp_path / "text.txt").write_text(data_file("shakespeare.txt").read_text()[:5_000])
    out = tmp_path / "out"
    settings = dict(steps=4, batch=2, seq_len=16, lr=1e-3, warmup=0, sample_tokens=0, temperature=1.0, top_k=0,
                    seed=0, val_every=2, threads=2)
    r = train(specs.load(str(tmp_path / "micro.toml")), [str(tmp_path / "text.txt")], out, echo=lambda _: None,
              **settings)
    assert r.report == out / "run/report.html" and png_size((out / "run/report.png").read_bytes()) == (1200, 900)
    assert "<td>run</td><td>4</td>" in r.report.read_text()
    args = ["train", "--spec", tmp_path / "micro.toml", "--data", tmp_path / "text.txt", "--steps", 4, "-b", 2,
            "-t", 16, "--val-every", 2, "--sample-tokens", 0, "--threads", 2, "-o", out]
    lines = CliRunner().invoke(cli, list(map(str, args))).output.splitlines()
    done = next(i for i, line in enumerate(lines) if line.startswith("done in "))
    assert lines[done + 1] == f"report: {out / 'run/report.html'}"
    # without matplotlib: no report, and a hint how to get one
    (out / "run/report.html").unlink()
    code = ("import sys; sys.modules['matplotlib'] = None; from llmgen.cli import main; "
            f"sys.argv = ['llmgen', *{list(map(str, args))!r}]; main()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    done = next(i for i, line in enumerate(lines) if line.startswith("done in "))
    assert lines[done + 1] == f'report: pip install "llmgen[report]" for plots of this run ' \
                              f'(then: llmgen report {out / "run"})'
    assert not (out / "run/report.html").exists()


def test_help():
    r = CliRunner().invoke(cli, ["report", "--help"])
    assert r.exit_code == 0 and "Usage: cli report [OPTIONS] RUN_DIR..." in r.output and "--log-scale" in r.output
