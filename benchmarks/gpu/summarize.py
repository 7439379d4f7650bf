"""Merge the JSON files of one run_all.sh or first_call.sh into gpu_bench.json / gpu_bench.md /
planner_rows.json, check issue #18's targets, and print the short summary table (last, so it is what
a terminal or a log tail shows).

    python benchmarks/gpu/summarize.py RAW_DIR RESULTS_DIR

gpu_bench.json     {"runs": {name: the bench JSON of that run}, device, versions}
gpu_bench.md       every run's table, then the planner check (predicted vs measured memory, and
                   predicted fit vs out-of-memory under --max_memory)
planner_rows.json  the rows measured at gpt2fit's default kernels (no compile, SDPA auto, TF32 on,
                   bf16, block 1024): copy it into benchmarks/ and `gpt2fit plan` uses their MFU.
                   (gpu_bench.json must NOT go into benchmarks/ itself: the planner takes the median
                   of every matching row, and eager attention or the math SDPA kernel would drag it.)
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from gpt2fit.train.bench_report import table
from gpt2fit.units import GiB, format_bytes

DEFAULTS = {"grad_checkpointing": False, "optimizer": "adamw", "loss_chunk_size": 0, "compile": False,
            "attn_implementation": "sdpa", "sdpa_backend": "auto", "tf32": True, "data": "random", "num_workers": 0,
            "pin_memory": True, "max_memory": None, "host_sync": "step", "compile_scope": "model", "compile_mode": "default"}
PLANNER_KERNELS = {"compile": False, "attn_implementation": "sdpa", "sdpa_backend": "auto", "tf32": True,
                   "precision": "bf16", "block_size": 1024, "host_sync": "step"}


SHORT = {"grad_checkpointing": "ckpt", "optimizer": "", "loss_chunk_size": "chunk", "compile": "compile",
         "attn_implementation": "", "sdpa_backend": "sdpa:", "tf32": "tf32:", "data": "", "num_workers": "workers:",
         "max_memory": "cap:", "pad_vocab_to": "pad", "host_sync": "sync:", "compile_scope": "scope:",
         "compile_mode": "mode:", "pin_memory": "pin"}


def levers(r: dict) -> list[str]:
    """The settings that differ from gpt2fit's defaults, in short words (ckpt, adamw8bit, chunk4096...)."""
    out = []
    for k, v in {**DEFAULTS, "pad_vocab_to": 1}.items():
        got = r.get(k, r["settings"].get(k, v))
        if got != v and got is not None:
            out.append(SHORT[k] if got is True else f"{SHORT[k]}{'off' if got is False else got}")
    return out


def lever_text(r: dict) -> str:
    return " ".join(levers(r)) or "default"


def planner_check(rows: list[dict]) -> list[str]:
    out = ["## Planner check", ""]
    ratios = [(r["_run"], r["id"], r["predicted_over_reserved"]) for r in rows if r.get("predicted_over_reserved")]
    if ratios:
        within = [x for x in ratios if 0.9 <= x[2] <= 1.1]
        vals = [x[2] for x in ratios]
        out.append(f"predicted / measured peak reserved: {len(within)}/{len(ratios)} rows within +-10% "
                   f"(min {min(vals):.2f}, median {statistics.median(vals):.2f}, max {max(vals):.2f})")
        worst = sorted(ratios, key=lambda x: abs(x[2] - 1), reverse=True)[:5]
        out.append("furthest off: " + ", ".join(f"{run}/{i} {v:.2f}" for run, i, v in worst))
    capped = [r for r in rows if r.get("max_memory") and (r.get("tokens_per_s") or r.get("oom"))]
    if capped:
        agree = {"fits_rule": 0, "within_cap": 0}
        lines = []
        for r in capped:
            ran = not r["oom"]
            agree["fits_rule"] += r.get("predicted_fits") == ran
            agree["within_cap"] += r.get("predicted_within_cap") == ran
            if r.get("predicted_within_cap") != ran:
                pred = r.get("predicted_peak_bytes")
                lines.append(f"  {r['_run']}/{r['id']} {r['model']} {lever_text(r)} micro {r['micro_batch_size']}: "
                             f"{'ran' if ran else 'OOM'}, predicted {format_bytes(pred) or 'n/a'}")
        out.append(f"under --max_memory: the prediction's total <= cap agrees with what happened in "
                   f"{agree['within_cap']}/{len(capped)} cells; the planner's fit rule (minus the 0.75 GiB CUDA "
                   f"reserve, 10% margin) in {agree['fits_rule']}/{len(capped)}")
        out += ["disagreements (total <= cap):"] + lines if lines else []
    return out


def targets(docs: dict) -> list[str]:
    """Issue #18's targets as far as these runs measured them: MFU (datasheet peak) and the speedup over
    the Trainer, uncapped rows; the largest micro-batch that ran under --max_memory, per model, with or
    without checkpointing, vocab padded (pretraining) or not (the finetune shape)."""
    rows = [r for d in docs.values() for r in d["rows"]]
    ran = [r for r in rows if r.get("tokens_per_s")]
    verdict = lambda ok: "met" if ok else "MISSED"  # noqa: E731
    out = ["## Targets (issue #18)", ""]
    for model in dict.fromkeys(r["model"] for r in ran if not r.get("max_memory")):
        mine = [r for r in ran if r["model"] == model and not r.get("max_memory")]
        goal = {"gpt2": 0.45, "gpt2-medium": 0.50}.get(model)
        best = max(mine, key=lambda r: r.get("mfu") or 0)
        if best.get("mfu") is not None:
            out.append(f"MFU {model}: best {100 * best['mfu']:.1f}% ({lever_text(best)})" +
                       (f"; target {goal:.0%}: {verdict(best['mfu'] >= goal)}" if goal else ""))
        like = [r for r in mine if r.get("vs_trainer_like_for_like") and r.get("speedup_vs_trainer")]
        fastest = max(mine, key=lambda r: r.get("speedup_vs_trainer") or 0)
        if like and fastest.get("speedup_vs_trainer"):
            out.append(f"tokens/s vs Trainer {model}: like for like {like[0]['speedup_vs_trainer']:.2f}x, best "
                       f"{fastest['speedup_vs_trainer']:.2f}x ({lever_text(fastest)})" +
                       (f"; target 1.5x: {verdict(fastest['speedup_vs_trainer'] >= 1.5)}" if goal else ""))
    shapes: dict = {}  # under a cap: model, cap, vocab padding (none: the finetune shape; 64: pretraining)
    for r in rows:
        if r.get("max_memory") and r.get("micro_batch_size"):
            shapes.setdefault((r["model"], r["max_memory"], r["settings"].get("pad_vocab_to", 1)), []).append(r)
    for (model, cap, pad), rs in shapes.items():
        largest = {ckpt: max((r["micro_batch_size"] for r in rs if r.get("tokens_per_s")
                              and bool(r["grad_checkpointing"]) == ckpt), default=None) for ckpt in (False, True)}
        ooms = sorted({r["micro_batch_size"] for r in rs if r.get("oom")})
        vocab = f"vocab padded to {pad}" if pad > 1 else "vocab unpadded"
        line = (f"under {cap}, {model}, {vocab}: largest micro-batch that ran {largest[False] or '-'} without "
                f"checkpointing, {largest[True] or '-'} with; OOM at {ooms or 'none'}")
        # the targets: gpt2 without checkpointing; gpt2-medium (pretraining, finetuning) with any levers
        best = largest[False] if model == "gpt2" else max((m for m in largest.values() if m), default=None)
        if model in ("gpt2", "gpt2-medium"):
            line += f"; target 16{' without checkpointing' if model == 'gpt2' else ''}: {verdict((best or 0) >= 16)}"
        out.append(line)
    return out


def short_table(docs: dict) -> str:
    """One block per run, in the order they ran: its common settings once, then a line per cell."""
    head = ("id", "levers", "micro", "tok/s", "step ms", "MFU", "MFU meas", "res GiB", "pred/res", "vs Trainer")
    blocks = []
    for name, d in docs.items():
        rows = d["rows"] + d.get("baselines", [])
        common = set.intersection(*(set(levers(r)) for r in d["rows"])) if d["rows"] else set()
        models = sorted({str(r.get("model")) for r in rows})
        body = []
        for r in rows:
            trainer = r["kind"] == "trainer"
            lev = "HF Trainer " + str(r.get("trainer_optim") or "") if trainer else \
                " ".join(x for x in levers(r) if x not in common) or "-"
            if len(models) > 1:
                lev = f"{r.get('model')} {lev}"
            cells = [r["id"], lev, str(r.get("micro_batch_size") or "")]
            if r.get("oom") or r.get("error") or not r.get("tokens_per_s"):
                cells += ["OOM" if r.get("oom") else "ERROR"] + [""] * 6
            else:
                sp, ratio = r.get("speedup_vs_trainer"), r.get("predicted_over_reserved")
                cells += [f"{r['tokens_per_s'] / 1e3:.1f}k", f"{1000 * r['step_time_median_s']:.1f}",
                          "" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%",
                          "" if r.get("mfu_measured_peak") is None else f"{100 * r['mfu_measured_peak']:.1f}%",
                          "" if r.get("peak_reserved_bytes") is None else f"{r['peak_reserved_bytes'] / GiB:.2f}",
                          "" if ratio is None else f"{ratio:.2f}", "" if sp is None else f"{sp:.2f}x"]
            body.append(cells)
        title = f"{name}: {', '.join(models)}, block {d['rows'][0]['block_size'] if d['rows'] else '?'}" + \
            (f"; all: {' '.join(sorted(common))}" if common else "")
        blocks.append((title, body))
    widths = [max([len(head[i])] + [len(str(c[i])) for _, body in blocks for c in body]) for i in range(len(head))]
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    lines = [fmt(head)]
    for title, body in blocks:
        lines += [title] + [fmt(c) for c in body]
    return "\n".join(lines)


def main(raw: str, results: str) -> int:
    raw_dir, out_dir = Path(raw), Path(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    docs = {}
    for f in sorted(raw_dir.glob("*.json"), key=lambda f: f.stat().st_mtime):  # in the order they ran
        try:
            docs[f.stem] = json.loads(f.read_text())
        except ValueError as e:
            print(f"skipping {f}: {e}", file=sys.stderr)
    if not docs:
        print("no results to summarize", file=sys.stderr)
        return 1
    first = next(iter(docs.values()))
    rows = [{**r, "_run": name} for name, d in docs.items() for r in d["rows"]]
    merged = {"benchmark": "gpt2fit GPU suite (benchmarks/gpu/run_all.sh, first_call.sh)", "device": first["device"],
              "versions": first["versions"], "gpt2fit": first.get("gpt2fit"), "runs": docs}
    (out_dir / "gpu_bench.json").write_text(json.dumps(merged, indent=1) + "\n")
    planner = [{k: v for k, v in r.items() if k not in ("step_times_s", "warmup_times_s")}
               for r in rows if not r["oom"] and not r["error"] and r.get("mfu") is not None
               and all(r.get(k) == v for k, v in PLANNER_KERNELS.items())]
    (out_dir / "planner_rows.json").write_text(json.dumps(
        {"benchmark": "gpt2fit bench rows at default kernels, for `gpt2fit plan` (from benchmarks/gpu/)",
         "device": first["device"], "versions": first["versions"], "rows": planner}, indent=1) + "\n")
    md = [f"# gpt2fit GPU suite: {first['device']['name']}", ""]
    for name, d in docs.items():
        md += [f"## {name}", "", f"`{d['command']}`", "", table(d)]
    md += planner_check(rows) + [""] + targets(docs)
    (out_dir / "gpu_bench.md").write_text("\n".join(md) + "\n")
    print("\n".join(planner_check(rows)[2:] + targets(docs)[1:]))
    print(f"\nwrote {out_dir}/gpu_bench.json, gpu_bench.md, planner_rows.json ({len(planner)} planner rows)\n")
    precisions = sorted({str(r.get("precision")) for r in rows if r.get("precision")})
    print(f"{first['device']['name']}, torch {first['versions']['torch']}, transformers "
          f"{first['versions']['transformers']}, {'/'.join(precisions)}; levers = what differs from gpt2fit's "
          "defaults; pred/res = planner's predicted peak / measured peak reserved")
    print(short_table(docs))
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
