"""Loss curves of one or more runs, from their ``metrics.jsonl`` (examples: EPILOG): train loss (centered moving
average, raw values faint) and val loss against tokens (or steps), optional reference lines, the y range skipping
the first 10% of each curve; a second panel for HellaSwag acc_norm when logged. ``<name>.json`` next to the PNG
holds exactly the plotted series."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2fit import options
from gpt2fit.errors import UserError
from gpt2fit.formats import METRICS, PLOT, read_metrics, write_json_atomic
from gpt2fit.options import opt
from gpt2fit.units import finite, format_count

FIGSIZE = (10.0, 5.0)  # inches, one panel; two panels add HELLASWAG_HEIGHT
HELLASWAG_HEIGHT = 3.0
DPI = 100
DESCRIPTION = "Plot train/val loss (and HellaSwag when logged) of one or more runs."
EPILOG = """examples:
  gpt2fit plot out/quickstart
  gpt2fit plot out/a out/b --labels adamw,adamw8bit --ref '3.28=GPT-2 124M' --out cmp.png"""


def smooth_values(values, window: int | None = None) -> list[float]:
    """Centered moving average (no lag) over ``window`` points (1 = raw; None: ~2% of them); edges average less."""
    n = len(values)
    if window is None:
        window = max(1, n // 50)
    if window < 1:
        raise UserError(f"smooth window must be >= 1 point, got {window}")
    if n == 0:
        return []
    half = int(window) // 2
    kernel = np.ones(2 * half + 1)
    # the sum over the window / the number of points in it (fewer at the edges)
    sums = np.convolve(np.asarray(values, dtype=np.float64), kernel)[half : half + n]
    return (sums / np.convolve(np.ones(n), kernel)[half : half + n]).tolist()


def _zoom_top(runs, refs) -> float | None:
    """An upper y limit skipping the first 10% of each curve (the drop from ~log(vocab)); None: nothing to skip."""
    late, all_values = [], []
    for r in runs:
        for ys in (r["train"]["loss_smooth"], r["eval"]["val_loss"]):
            all_values += ys
            late += ys[len(ys) // 10 :]
    if not late or not all_values:
        return None
    lo = min(all_values + [v for v, _ in refs])
    hi = max(late + [v for v, _ in refs])
    top = hi + 0.15 * max(hi - lo, 1e-3)
    return top if top < max(all_values) else None


def _series(rows, x: str, y: str) -> tuple[list, list]:
    points = [(r[x], r[y]) for r in rows if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_runs(run_dirs, out_path, *, x="tokens", reference_lines=(), labels=None, smooth=None) -> Path:
    """Plot the runs' loss curves into ``out_path`` (PNG; returned), the series into ``<stem>.json``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    if x not in ("tokens", "step"):
        raise UserError(f"x must be 'tokens' or 'step', got {x!r}")
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise UserError("no run dirs to plot")
    paths = [d.resolve() for d in run_dirs] if labels is None else []
    unique = len({p.name for p in paths}) == len(paths)  # default labels: the dir names, parent/name where two clash
    labels = list(labels) if labels is not None else [p.name if unique else f"{p.parent.name}/{p.name}" for p in paths]
    if len(labels) != len(run_dirs):
        raise UserError(f"{len(labels)} label(s) for {len(run_dirs)} run dir(s); give one label per run")
    refs = [(float(v), str(label)) for v, label in
            (r if isinstance(r, (tuple, list)) else (r, f"{float(r):g}") for r in reference_lines)]

    runs = []
    for run_dir, label in zip(run_dirs, labels):
        m = read_metrics(run_dir)
        tx, ty = _series(m["train"], x, "loss")
        ex, ey = _series(m["eval"], x, "val_loss")
        hx, hy = _series(m["hellaswag"], x, "acc_norm")
        runs.append({"label": label, "run_dir": str(run_dir),
                     "train": {"x": tx, "loss": ty, "loss_smooth": smooth_values(ty, smooth)},
                     "eval": {"x": ex, "val_loss": ey}, "hellaswag": {"x": hx, "acc_norm": hy}})
    if not any(r["train"]["x"] or r["eval"]["x"] for r in runs):
        raise UserError(f"no train or eval rows with {x!r} in {', '.join(str(d / METRICS) for d in run_dirs)}; "
                        "nothing to plot yet (try --x step)")
    has_hs = any(r["hellaswag"]["x"] for r in runs)

    height = FIGSIZE[1] + (HELLASWAG_HEIGHT if has_hs else 0.0)
    fig = plt.figure(figsize=(FIGSIZE[0], height), dpi=DPI, layout="constrained")
    if has_hs:
        ax, ax_hs = fig.subplots(2, 1, sharex=True, height_ratios=(FIGSIZE[1], HELLASWAG_HEIGHT))
    else:
        ax, ax_hs = fig.subplots(1, 1), None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(runs):
        c = colors[i % len(colors)]
        if r["train"]["x"]:
            ax.plot(r["train"]["x"], r["train"]["loss"], color=c, alpha=0.2, linewidth=0.8)
            ax.plot(r["train"]["x"], r["train"]["loss_smooth"], color=c, linewidth=1.5, label=f"{r['label']} train")
        if r["eval"]["x"]:
            ax.plot(r["eval"]["x"], r["eval"]["val_loss"], color=c, linestyle="--", marker="o", markersize=3,
                    linewidth=1.5, label=f"{r['label']} val")
        if ax_hs is not None and r["hellaswag"]["x"]:
            ax_hs.plot(r["hellaswag"]["x"], r["hellaswag"]["acc_norm"], color=c, marker="o", markersize=3,
                       label=r["label"])
    for value, label in refs:
        ax.axhline(value, color="gray", linestyle=":", linewidth=1.2)
        ax.annotate(label, xy=(1.0, value), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                    textcoords="offset points", ha="right", va="bottom", fontsize=8, color="dimgray")
    if (top := _zoom_top(runs, refs)) is not None:
        ax.set_ylim(top=top)
    if x == "tokens":
        (ax_hs or ax).xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: format_count(v)))
    ax.set_title("loss" if len(runs) == 1 else "loss comparison")
    (ax_hs or ax).set_xlabel(x)
    for a, ylabel in ((ax, "loss"), (ax_hs, "HellaSwag acc_norm")):
        if a is not None:
            a.set_ylabel(ylabel)
            a.grid(True, alpha=0.3)
            a.legend(fontsize=8)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, format="png", dpi=DPI)
    plt.close(fig)
    write_json_atomic(out_path.with_suffix(".json"), {
        "x": x, "smooth": smooth, "reference_lines": [{"value": v, "label": l} for v, l in refs], "runs": runs})
    return out_path


@dataclass
class PlotOptions:
    """runs and drawing"""

    run_dirs: list[str] = opt([], "Run dir(s) holding metrics.jsonl.", positional=True, metavar="RUN_DIR")
    out: str | None = opt(None, f"PNG to write (default: RUN_DIR/{PLOT} for one run, ./loss_comparison.png for "
                                "several); the plotted series go next to it as <name>.json.")
    x: str = opt("tokens", "x axis: tokens seen or optimizer steps.", choices=("tokens", "step"))
    ref: list[str] = opt([], "Horizontal reference line(s) on the loss panel, VALUE or VALUE=LABEL, repeatable "
                             "(e.g. --ref 3.28 --ref '2.92=target').", metavar="VALUE[=LABEL]")
    labels: str | None = opt(None, "Comma-separated legend labels, one per RUN_DIR (default: the dir names).")
    smooth: int | None = opt(None, "Centered moving-average window for the train loss, in logged points; 1 = raw "
                                   "(default: about 2% of the points).", minimum=1)


def parse_ref(text: str):
    """"3.28" -> 3.28; "3.28=GPT-2 124M" -> (3.28, "GPT-2 124M")."""
    value, _, label = text.partition("=")
    try:
        v = finite(float(value), "--ref")
    except ValueError:
        raise UserError(f"--ref {text!r}: expected VALUE or VALUE=LABEL, e.g. --ref '3.28=GPT-2 124M'.") from None
    return (v, label) if label else v


def main(argv=None) -> int:
    (o,), _ = options.parse(argv, [PlotOptions], prog="gpt2fit plot", description=DESCRIPTION, epilog=EPILOG)
    labels = [s.strip() for s in o.labels.split(",")] if o.labels else None
    out = Path(o.out or (Path(o.run_dirs[0]) / PLOT if len(o.run_dirs) == 1 else "loss_comparison.png"))
    refs = [parse_ref(r) for r in o.ref]
    path = plot_runs(o.run_dirs, out, x=o.x, reference_lines=refs, labels=labels, smooth=o.smooth)
    print(f"wrote {path} (series in {path.with_suffix('.json')})")
    return 0

