"""gpt2fit.plot: metrics.jsonl -> PNG + the plotted series as JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2fit import cli
from gpt2fit.evaluate import plot as gp
from gpt2fit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_run(d: Path, *, steps=40, tokens_per_step=4096, hellaswag=False, seed=0, truncate=False) -> dict:
    """Write a run dir whose metrics.jsonl has train/eval(/hellaswag) rows; return the rows."""
    d.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "eval": [], "hellaswag": []}
    lines = []
    for step in range(1, steps + 1):
        tokens = step * tokens_per_step
        loss = 3.0 + 8.0 * math.exp(-step / 10) + 0.05 * math.sin(step * (seed + 1))
        row = {"kind": "train", "step": step, "tokens": tokens, "loss": loss, "lr": 6e-4, "grad_norm": 1.0}
        rows["train"].append(row)
        lines.append(row)
        if step % 10 == 0:
            ev = {"kind": "eval", "step": step, "tokens": tokens, "val_loss": loss + 0.1, "val_ppl": math.exp(loss + 0.1)}
            rows["eval"].append(ev)
            lines.append(ev)
            if hellaswag:
                hs = {"kind": "hellaswag", "step": step, "tokens": tokens, "acc": 0.25 + step / 1000, "acc_norm": 0.26 + step / 1000, "n": 100}
                rows["hellaswag"].append(hs)
                lines.append(hs)
    text = "".join(json.dumps(r) + "\n" for r in lines)
    if truncate:  # a killed run: half a line at the end
        text += json.dumps({"kind": "train", "step": steps + 1, "tokens": 1, "loss": 1.0})[:25]
    (d / "metrics.jsonl").write_text(text)
    return rows


def read_png(path: Path):
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 10_000
    return mpimg.imread(path)


def test_read_metrics_splits_kinds_and_tolerates_truncation(tmp_path):
    rows = fake_run(tmp_path / "run", hellaswag=True, truncate=True)
    m = gp.read_metrics(tmp_path / "run")
    for kind in ("train", "eval", "hellaswag"):
        assert m[kind] == rows[kind]


def test_read_metrics_resumed_run_drops_overwritten_rows(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    steps = [1, 2, 3, 4, 3, 4, 5]  # killed after step 4, resumed from a step-2 checkpoint
    (d / "metrics.jsonl").write_text(
        "".join(json.dumps({"kind": "train", "step": s, "tokens": s * 10, "loss": float(i)}) + "\n" for i, s in enumerate(steps))
    )
    train = gp.read_metrics(d)["train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in train] == [0.0, 1.0, 4.0, 5.0, 6.0]


def test_plot_one_run_png_and_series(tmp_path):
    run = tmp_path / "run"
    rows = fake_run(run, truncate=True)
    out = gp.plot_runs([run], run / "loss.png", smooth=5)
    assert out == run / "loss.png"
    img = read_png(out)
    assert img.shape == (int(gp.FIGSIZE[1] * gp.DPI), int(gp.FIGSIZE[0] * gp.DPI), 4)
    assert img[..., :3].std() > 0.01  # something was drawn
    series = json.loads((run / "loss.json").read_text())
    assert series["x"] == "tokens"
    (r,) = series["runs"]
    assert r["label"] == "run"
    assert r["train"]["x"] == [row["tokens"] for row in rows["train"]]
    assert r["train"]["loss"] == [row["loss"] for row in rows["train"]]
    assert r["eval"]["x"] == [row["tokens"] for row in rows["eval"]]
    assert r["eval"]["val_loss"] == [row["val_loss"] for row in rows["eval"]]
    assert r["hellaswag"]["x"] == []
    # the smoothed curve: a centered 5-point mean (fewer points at the edges)
    y = r["train"]["loss"]
    want = [sum(y[max(0, i - 2) : i + 3]) / len(y[max(0, i - 2) : i + 3]) for i in range(len(y))]
    assert r["train"]["loss_smooth"] == pytest.approx(want, rel=1e-12)
    assert r["train"]["loss_smooth"] != y


def test_smooth_values_default_is_light():
    y = [float(i % 7) for i in range(500)]
    assert gp.smooth_values(y[:40]) == y[:40]  # short runs: raw
    s = gp.smooth_values(y)  # 500 points: 2% = 10, i.e. 5 on each side, centered
    assert len(s) == 500 and s != y
    assert s[250] == pytest.approx(sum(y[245:256]) / 11)
    assert gp.smooth_values([1.0, 2.0, 6.0], 11) == [3.0, 3.0, 3.0]  # a window wider than the run
    assert gp.smooth_values([], 5) == []


def test_plot_several_runs_with_hellaswag_refs_and_steps(tmp_path):
    a = fake_run(tmp_path / "a", hellaswag=True)
    b = fake_run(tmp_path / "b", steps=25, seed=1)
    out = gp.plot_runs(
        [tmp_path / "a", tmp_path / "b"], tmp_path / "cmp" / "both.png", x="step",
        reference_lines=(3.28, (2.92, "target")), labels=["base", "other"], smooth=1,
    )  # fmt: skip
    img = read_png(out)
    assert img.shape == (int((gp.FIGSIZE[1] + gp.HELLASWAG_HEIGHT) * gp.DPI), int(gp.FIGSIZE[0] * gp.DPI), 4)
    series = json.loads((tmp_path / "cmp" / "both.json").read_text())
    assert series["x"] == "step"
    assert series["reference_lines"] == [{"value": 3.28, "label": "3.28"}, {"value": 2.92, "label": "target"}]
    ra, rb = series["runs"]
    assert (ra["label"], rb["label"]) == ("base", "other")
    assert ra["train"]["x"] == [r["step"] for r in a["train"]]
    assert ra["train"]["loss_smooth"] == ra["train"]["loss"]  # smooth=1: raw
    assert ra["hellaswag"]["x"] == [r["step"] for r in a["hellaswag"]]
    assert ra["hellaswag"]["acc_norm"] == [r["acc_norm"] for r in a["hellaswag"]]
    assert rb["train"]["loss"] == [r["loss"] for r in b["train"]]
    assert rb["hellaswag"]["x"] == []


def test_plot_errors(tmp_path):
    fake_run(tmp_path / "a")
    with pytest.raises(UserError, match="metrics.jsonl"):
        gp.plot_runs([tmp_path / "a", tmp_path / "missing"], tmp_path / "x.png")
    with pytest.raises(UserError, match="label"):
        gp.plot_runs([tmp_path / "a"], tmp_path / "x.png", labels=["a", "b"])


def test_cli_plot_defaults(tmp_path, monkeypatch, capsys):
    fake_run(tmp_path / "r1")
    fake_run(tmp_path / "r2", hellaswag=True)
    assert cli.main(["plot", str(tmp_path / "r1"), "--ref", "3.28", "--ref", "2.92=goal"]) == 0
    assert (tmp_path / "r1" / "loss.png").read_bytes()[:8] == PNG_SIGNATURE
    series = json.loads((tmp_path / "r1" / "loss.json").read_text())
    assert [r["value"] for r in series["reference_lines"]] == [3.28, 2.92]
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plot", "r1", "r2", "--labels", "one,two", "--x", "step"]) == 0
    series = json.loads((tmp_path / "loss_comparison.json").read_text())
    assert [r["label"] for r in series["runs"]] == ["one", "two"]
    assert (tmp_path / "loss_comparison.png").is_file()
    assert "wrote" in capsys.readouterr().out


def test_cli_plot_bad_run_dir_exits_2(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path / "nope") in err.splitlines()[0]


def test_cli_plot_refs_in_one_flag_and_bad_values(tmp_path, capsys):
    fake_run(tmp_path / "r")
    assert cli.main(["plot", str(tmp_path / "r"), "--ref", "3.28", "2.92=goal", "--out", str(tmp_path / "o.png")]) == 0
    series = json.loads((tmp_path / "o.json").read_text())
    assert series["reference_lines"] == [{"value": 3.28, "label": "3.28"}, {"value": 2.92, "label": "goal"}]
    capsys.readouterr()
    for bad, needle in ((["--ref", "abc"], "--ref"), (["--ref", "nan=x"], "--ref"), (["--smooth", "0"], "smooth"),
                        (["--x", "time"], "time")):
        assert cli.main(["plot", str(tmp_path / "r"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and needle in err.splitlines()[0], err


def test_script_entry_point(tmp_path):
    fake_run(tmp_path / "r")
    p = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot.py"), str(tmp_path / "r"), "--out", str(tmp_path / "o.png")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "o.png").read_bytes()[:8] == PNG_SIGNATURE
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "plot.py"), str(tmp_path / "nope")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: ")
