"""Time to quality: Muon (block matrices) + AdamW (the rest) against AdamW alone, both tuned.

A fixed small GPT-2 (4 layers x 4 heads x 256 wide, block 128, the GPT-2 tokenizer's 50,257 ids,
16.1M parameters) on Python's standard library sources tokenized with the GPT-2 tokenizer from
../shared (4.1M train tokens; one run reads 0.37M of them, so no window repeats). Every run is a
real `gpt2fit train` process with the same flags except the optimizer and its rates:
  1. AdamW at each of ADAMW_LRS, seed 0;
  2. Muon at each of MUON_LRS for the block matrices, the other parameters at AdamW's best rate, seed 0;
  3. the best rate of each again with seed 1.
The best rate is the lowest final val loss of step 1 / 2; a sweep whose best is at an end of its grid
goes on by factors of 2 past that end (at most twice), so neither optimizer is held at a bad rate. Report: val loss against tokens (mean of
the two seeds at the best rate), and the tokens and wall time Muon needs to reach AdamW's final
val loss (linear interpolation between evaluations; time = the run's own training clock).

    python benchmarks/time_to_quality/run.py            # ~45 min on 2 CPU cores, idle machine
    python benchmarks/time_to_quality/run.py --smoke    # 3 steps a run: checks the flow only
Writes result.json (raw, every eval of every run, device and versions), curves.png and table.md.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import accelerate
import torch
import transformers

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
TOKENIZER = ROOT.parent / "shared" / "gpt2-tokenizer"
ADAMW_LRS = [5e-4, 1e-3, 2e-3]
MUON_LRS = [2e-3, 4e-3, 8e-3]  # (the committed result's sweep started at 5e-4 and went up to 8e-3)
STEPS, EVAL_EVERY = 180, 20
# 16 micro-batch * 128 block * 1 accumulation = 2,048 tokens per optimizer step; 180 steps = 368,640 tokens
FLAGS = dict(n_layer=4, n_head=4, n_embd=256, block_size=128, dropout=0.0, micro_batch_size=16, grad_accum_steps=1,
             warmup_steps=18, lr_schedule="cosine", weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0,
             eval_batches=8, eval_before_training=True, checkpoint_interval=0, report_to="none",
             mixed_precision="no")


def prepare(data: Path) -> None:
    if not (data / "meta.json").exists():
        if not TOKENIZER.is_dir():
            sys.exit(f"error: the GPT-2 tokenizer is not at {TOKENIZER} (../shared/gpt2-tokenizer)")
        subprocess.run([sys.executable, "-m", "gpt2fit.cli", "prepare", "--input", "stdlib", "--tokenizer",
                        str(TOKENIZER), "--out_dir", str(data)], check=True)


def train(data: Path, out: Path, steps: int, optimizer: str, lr: float, seed: int, muon_lr: float | None) -> dict:
    flags = dict(FLAGS, data_dir=data, out_dir=out, max_steps=steps, optimizer=optimizer, learning_rate=lr,
                 min_lr=lr / 10, seed=seed, eval_interval=min(EVAL_EVERY, steps), log_interval=min(EVAL_EVERY, steps),
                 overwrite=True)
    if muon_lr is not None:
        flags["muon_learning_rate"] = muon_lr
    argv = [a for k, v in flags.items() for a in (f"--{k}", str(v))]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "gpt2fit.cli", "train", *argv], capture_output=True, text=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"))
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        sys.exit(f"error: run {out.name} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    clock = {r["step"]: r["time_s"] for r in rows if r["kind"] == "train"}
    evals = [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"], "time_s": clock.get(r["step"], 0.0)}
             for r in rows if r["kind"] == "eval"]
    return dict(optimizer=optimizer, learning_rate=lr, muon_learning_rate=muon_lr, seed=seed, steps=steps,
                wall_s=wall, final_val_loss=evals[-1]["val_loss"], evals=evals)


def sweep(run_at, grid: list[float], extensions: int = 2) -> float:
    """``run_at(rate)`` (-> final val loss) over ``grid``; while the best is at an end, one more rate
    past it (x2 or /2), at most ``extensions`` times. Returns the best rate."""
    grid, finals = sorted(grid), {}
    for _ in range(extensions + 1):
        for rate in grid:
            if rate not in finals:
                finals[rate] = run_at(rate)
        best = min(finals, key=finals.get)
        if grid[0] < best < grid[-1]:
            break
        grid = [best / 2, *grid] if best == grid[0] else [*grid, best * 2]
    return best


def crossing(evals: list[dict], target: float, key: str) -> float | None:
    """``key`` (tokens or time_s) where the val curve first reaches ``target``, linearly interpolated."""
    for a, b in zip(evals, evals[1:]):
        if b["val_loss"] <= target < a["val_loss"]:
            f = (a["val_loss"] - target) / (a["val_loss"] - b["val_loss"])
            return a[key] + f * (b[key] - a[key])
    return None


def mean_curve(runs: list[dict]) -> list[dict]:
    return [{k: sum(r["evals"][i][k] for r in runs) / len(runs) for k in ("step", "tokens", "val_loss", "time_s")}
            for i in range(len(runs[0]["evals"]))]


def summarize(runs: list[dict]) -> dict:
    def best(opt):
        sweep = [r for r in runs if r["optimizer"] == opt and r["seed"] == 0]
        b = min(sweep, key=lambda r: r["final_val_loss"])
        rate = b["muon_learning_rate"] if opt == "muon" else b["learning_rate"]
        tried = sorted(r["muon_learning_rate"] if opt == "muon" else r["learning_rate"] for r in sweep)
        seeds = [r for r in runs if r["optimizer"] == opt and r["learning_rate"] == b["learning_rate"]
                 and r["muon_learning_rate"] == b["muon_learning_rate"]]
        return dict(best_rate=rate, best_rate_at_grid_edge=rate in (tried[0], tried[-1]),
                    sweep={str(r["muon_learning_rate"] if opt == "muon" else r["learning_rate"]): r["final_val_loss"]
                           for r in sweep},
                    seeds=[r["seed"] for r in seeds], curve=mean_curve(seeds))
    out = {opt: best(opt) for opt in ("adamw", "muon")}
    a, m = out["adamw"]["curve"], out["muon"]["curve"]
    target = a[-1]["val_loss"]
    tok, sec = crossing(m, target, "tokens"), crossing(m, target, "time_s")
    out["target_val_loss"] = target
    out["muon_final_val_loss"] = m[-1]["val_loss"]
    out["muon_tokens_to_target"], out["adamw_tokens"] = tok, a[-1]["tokens"]
    out["muon_time_s_to_target"], out["adamw_time_s"] = sec, a[-1]["time_s"]
    out["token_fraction"] = tok / a[-1]["tokens"] if tok is not None else None
    out["time_fraction"] = sec / a[-1]["time_s"] if sec is not None else None
    return out


def plot(runs: list[dict], summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = {"adamw": "tab:blue", "muon": "tab:red"}
    for opt in ("adamw", "muon"):
        s = summary[opt]
        for r in runs:
            rate = r["muon_learning_rate"] if opt == "muon" else r["learning_rate"]
            if r["optimizer"] == opt and rate == s["best_rate"]:
                ax.plot([e["tokens"] / 1e6 for e in r["evals"][1:]], [e["val_loss"] for e in r["evals"][1:]],
                        color=colors[opt], alpha=0.3, lw=1)
        c = s["curve"][1:]
        label = f"{opt} (lr {s['best_rate']:g}{', rest at AdamW best' if opt == 'muon' else ''})"
        ax.plot([e["tokens"] / 1e6 for e in c], [e["val_loss"] for e in c], color=colors[opt], lw=2, label=label)
        rates = sorted(s["sweep"], key=float)
        bx.plot([float(x) for x in rates], [s["sweep"][x] for x in rates], "o-", color=colors[opt], label=opt)
    ax.axhline(summary["target_val_loss"], color="gray", ls=":", lw=1)
    if summary["muon_tokens_to_target"]:
        ax.axvline(summary["muon_tokens_to_target"] / 1e6, color="tab:red", ls=":", lw=1)
        ax.set_title(f"Muon reaches AdamW's final loss in {summary['token_fraction']:.2f}x the tokens", fontsize=10)
    ax.set(xlabel="training tokens (M)", ylabel="val loss (mean of 2 seeds)")
    ax.legend()
    bx.set_xscale("log")
    ticks = sorted({float(x) for o in ("adamw", "muon") for x in summary[o]["sweep"]})
    bx.set_xticks(ticks, [f"{t:g}" for t in ticks], minor=False)
    bx.minorticks_off()
    bx.set(xlabel="learning rate (muon: block matrices)", ylabel="final val loss, seed 0", title="LR sweep")
    bx.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def table(summary: dict) -> str:
    a, m = summary["adamw"], summary["muon"]
    f = summary["token_fraction"]
    rows = ["| | AdamW | Muon + AdamW |", "|---|---|---|",
            f"| best LR (of {len(a['sweep'])} / {len(m['sweep'])} tried) | {a['best_rate']:g} | {m['best_rate']:g} "
            f"(rest {summary['adamw']['best_rate']:g}) |",
            f"| final val loss (2 seeds) | {a['curve'][-1]['val_loss']:.4f} | {m['curve'][-1]['val_loss']:.4f} |",
            f"| tokens to {summary['target_val_loss']:.4f} | {summary['adamw_tokens']:,.0f} | "
            + (f"{summary['muon_tokens_to_target']:,.0f} ({f:.2f}x) |" if f else "not reached |"),
            f"| training time to it | {summary['adamw_time_s']:.0f} s | "
            + (f"{summary['muon_time_s_to_target']:.0f} s ({summary['time_fraction']:.2f}x) |" if f else "- |")]
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="3 steps a run, output in a temp dir: checks the flow.")
    ap.add_argument("--out", type=Path, default=HERE, help="Where result.json, curves.png, table.md go.")
    ap.add_argument("--work", type=Path, default=ROOT / "data" / "time_to_quality",
                    help="Data and run directories (large; not committed).")
    ap.add_argument("--fresh", action="store_true", help="Rerun every run, even those in an earlier result.json.")
    args = ap.parse_args()
    steps = 3 if args.smoke else STEPS
    data = args.work / "data"
    prepare(data)
    runs, t0 = [], time.perf_counter()
    out = args.out / ("smoke" if args.smoke else "")
    out.mkdir(parents=True, exist_ok=True)
    # a stopped or re-planned sweep keeps its finished runs: the same steps and flags, same key
    earlier = {}
    if (out / "result.json").exists() and not args.fresh:
        old = json.loads((out / "result.json").read_text())
        if all(old["settings"].get(k) == v for k, v in dict(FLAGS, steps=steps, eval_every=EVAL_EVERY).items()):
            earlier = {(r["optimizer"], r["learning_rate"], r["seed"], r["muon_learning_rate"]): r for r in old["runs"]}
    doc = dict(device=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
               torch_threads=torch.get_num_threads(), platform=platform.platform(),
               versions=dict(python=platform.python_version(), torch=torch.__version__,
                             transformers=transformers.__version__, accelerate=accelerate.__version__),
               settings=dict(FLAGS, steps=steps, eval_every=EVAL_EVERY, adamw_lrs=ADAMW_LRS, muon_lrs=MUON_LRS,
                             data="stdlib sources, GPT-2 tokenizer (../shared/gpt2-tokenizer)",
                             command=" ".join(["python", "benchmarks/time_to_quality/run.py", *sys.argv[1:]])),
               runs=runs)

    def go(optimizer, lr, seed, muon_lr=None):
        key = (optimizer, lr, seed, muon_lr)
        if key in earlier:
            runs.append(earlier[key])
            print(f"{key}: reused from the earlier result.json", flush=True)
        else:
            name = f"{optimizer}_lr{lr:g}{f'_muon{muon_lr:g}' if muon_lr else ''}_s{seed}"
            runs.append(train(data, args.work / "runs" / name, steps, optimizer, lr, seed, muon_lr))
            print(f"{name}: final val {runs[-1]['final_val_loss']:.4f}, {runs[-1]['wall_s']:.0f} s "
                  f"({time.perf_counter() - t0:.0f} s so far)", flush=True)
        (out / "result.json").write_text(json.dumps(doc, indent=1))  # partial results survive a stop
        return runs[-1]["final_val_loss"]

    adamw_best = sweep(lambda lr: go("adamw", lr, 0), ADAMW_LRS)
    muon_best = sweep(lambda mlr: go("muon", adamw_best, 0, mlr), MUON_LRS)
    go("adamw", adamw_best, 1)
    go("muon", adamw_best, 1, muon_best)
    runs += [r for r in earlier.values() if r not in runs]  # earlier sweep points outside today's grid
    doc["summary"] = summarize(runs)
    doc["total_run_s"] = sum(r["wall_s"] for r in runs)
    (out / "result.json").write_text(json.dumps(doc, indent=1))
    (out / "table.md").write_text(table(doc["summary"]))
    plot(runs, doc["summary"], out / "curves.png")
    print(table(doc["summary"]))


if __name__ == "__main__":
    main()
