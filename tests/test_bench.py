"""`gpt2fit bench` on the CPU: the JSON schema, the table, planner-readable rows, OOM rows and the
CLI's errors, on a tiny model. Timings are never asserted (a shared CPU makes them noise)."""

import json
import math

import pytest

from conftest import run_cli
from gpt2fit.train import bench as bench
from gpt2fit.errors import UserError
from gpt2fit.plan.planner import bench_rows

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--micro_batch_size", "4",
        "--warmup", "1", "--steps", "2"]
TIMING = ("tokens_per_s", "tokens_per_s_median", "step_time_median_s", "step_time_p90_s", "step_time_mean_s")
MEMORY = ("peak_allocated_bytes", "peak_reserved_bytes", "peak_rss_bytes", "memory_kind")


def check_measured(row: dict, steps: int = 2) -> None:
    assert not row["oom"] and row["error"] is None, row
    for key in TIMING:
        assert isinstance(row[key], float) and row[key] > 0, key
    assert row["step_time_p90_s"] >= row["step_time_median_s"]
    assert len(row["step_times_s"]) == steps and len(row["warmup_times_s"]) == 1
    for key in MEMORY:
        assert key in row
    assert row["peak_allocated_bytes"] is None and row["peak_rss_bytes"] > 0  # CPU: peak RSS, said so
    assert "rss" in row["memory_kind"].lower()
    assert row["mfu"] is None  # no datasheet peak for a CPU
    assert isinstance(row["mfu_measured_peak"], float) and row["mfu_measured_peak"] > 0
    assert row["predicted_peak_bytes"] > 0 and row["predicted_memory"]["total"] == row["predicted_peak_bytes"]
    assert row["flops_per_token"] > 0 and row["n_params_for_flops"] < row["n_params"]  # wpe is not counted
    assert math.isfinite(row["loss"])


def test_random_ids_grid_with_trainer_baseline(tmp_path, capsys):
    out = tmp_path / "bench" / "tiny.json"
    rc = bench.main(TINY + ["--vocab_size", "256", "--grid", "optimizer=adamw,adamw8bit", "--baseline", "trainer",
                            "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == 1 and doc["device"]["type"] == "cpu" and doc["device"]["name"] == "cpu"
    for key in ("torch", "transformers", "accelerate", "bitsandbytes", "cuda", "python"):
        assert key in doc["versions"]
    assert doc["flops"]["matmul_peaks"][0]["dtype"] == "fp32" and "wpe" in doc["flops"]["N"]
    assert doc["settings"]["warmup"] == 1 and doc["settings"]["steps"] == 2 and doc["settings"]["varied"] == ["optimizer"]
    rows = doc["rows"]
    assert [r["optimizer"] for r in rows] == ["adamw", "adamw8bit"]
    for r in rows:
        check_measured(r)
        assert r["kind"] == "gpt2fit" and r["data"] == "random" and r["settings"]["optimizer"] == r["optimizer"]
        assert r["model"] == "custom-L2-H2-C32" and r["device"] == "cpu" and r["loss_impl"] == "plain"
        assert r["micro_batch_size"] == 4 and r["tokens_per_step"] == 4 * 32 and r["vocab_size"] == 256
        assert r["speedup_vs_trainer"] > 0 and r["trainer_baseline"] == "trainer1"
    assert rows[0]["vs_trainer_like_for_like"] and not rows[1]["vs_trainer_like_for_like"]
    (base,) = doc["baselines"]
    assert base["kind"] == "trainer" and base["tokens_per_s"] > 0 and base["trainer_optim"].startswith("adamw")
    assert len(base["step_times_s"]) == 2 and "optimizer" not in base
    # the planner reads the gpt2fit rows (and not the Trainer's) from the output dir
    found = bench_rows([out.parent])
    assert [r["optimizer"] for r in found] == ["adamw", "adamw8bit"] and all(r["_file"] == "bench/tiny.json" for r in found)
    md = out.with_suffix(".md").read_text()
    printed = capsys.readouterr().out
    assert "| id | optimizer | tok/s |" in md and "HF Trainer" in md and "vs Trainer" in md
    assert printed.strip().splitlines()[-1].startswith("| trainer1")  # the table is printed last


def test_host_sync_lever_runs_the_sync_free_step(tmp_path):
    out = tmp_path / "sync.json"
    assert bench.main(TINY + ["--vocab_size", "256", "--grid", "host_sync=step,log", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["host_sync"] for r in rows] == ["step", "log"]
    for r in rows:
        check_measured(r)
        assert r["skipped_steps"] == 0 and r["timed_wall_s"] >= sum(r["step_times_s"]) * 0.5


def test_real_dataloader_and_random_ids_over_a_data_dir(char_data, tmp_path):
    out = tmp_path / "loader.json"
    rc = bench.main(TINY + ["--data_dir", str(char_data), "--grid", "data=random", "--grid", "data=loader",
                            "num_workers=0,1", "--out", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    assert [(r["data"], r["num_workers"]) for r in rows] == [("random", 0), ("loader", 0), ("loader", 1)]
    vocab = json.loads((char_data / "meta.json").read_text())["tokenizer"]["vocab_size"]
    for r in rows:
        check_measured(r)
        assert r["vocab_size"] == vocab and r["speedup_vs_trainer"] is None
    assert sorted(doc["settings"]["varied"]) == ["data", "num_workers"]
    assert len(bench_rows([tmp_path])) == 3


def test_oom_cell_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    import torch

    real = bench.train_step

    def step(run, batches):  # the 8-bit cell "runs out of memory" in its first step
        if run.cfg.optim.optimizer == "adamw8bit":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(run, batches)

    monkeypatch.setattr(bench, "train_step", step)
    out = tmp_path / "oom.json"
    assert bench.main(TINY + ["--vocab_size", "256", "--max_memory", "12GiB", "--grid", "optimizer=adamw8bit,adamw",
                              "--out", str(out)]) == 0
    oom, ok = json.loads(out.read_text())["rows"]
    assert set(oom) == set(ok)  # every row has every key
    assert oom["oom"] is True and oom["error"] is None and oom["optimizer"] == "adamw8bit"
    assert oom["tokens_per_s"] is None and oom["mfu"] is None and oom["predicted_peak_bytes"] > 0
    assert oom["predicted_peak_bytes"] < ok["predicted_peak_bytes"]  # 8-bit states are smaller
    assert oom["micro_batch_size"] == 4 and oom["n_params"] == ok["n_params"] and oom["memory_at_failure"]
    assert "out of memory" in oom["error_message"]
    check_measured(ok)
    assert ok["max_memory"] == "12GiB" and ok["predicted_within_cap"] is True and ok["predicted_fits"] is True
    assert "OOM" in out.with_suffix(".md").read_text()
    assert len(bench_rows([tmp_path])) == 2  # an OOM row is still a row (the planner skips its mfu=None)


def test_grid_expansion_and_checks():
    cells = bench.parse_grid([["optimizer=adamw,adamw8bit", "compile=false,true"], ["optimizer=adamw"],
                                      ["loss_chunk_size=1024"]])
    assert cells == [{"optimizer": "adamw", "compile": False}, {"optimizer": "adamw", "compile": True},
                     {"optimizer": "adamw8bit", "compile": False}, {"optimizer": "adamw8bit", "compile": True},
                     {"optimizer": "adamw"}, {"loss_chunk_size": 1024}]
    assert bench.parse_grid(None) == [{}]
    with pytest.raises(UserError, match="adamw9bit.*not one of.*Did you mean 'adamw8bit'"):
        bench.parse_grid([["optimizer=adamw9bit"]])
    with pytest.raises(UserError, match="'max_steps' cannot be varied.*--steps"):
        bench.parse_grid([["max_steps=3"]])
    with pytest.raises(UserError, match="sdpa_backend='flashy'.*Did you mean 'flash'"):
        bench.parse_grid([["sdpa_backend=flashy"]])
    with pytest.raises(UserError, match="not key=value"):
        bench.parse_grid([["compile"]])
    with pytest.raises(UserError, match="cell c1 .*n_embd=30 must be divisible by n_head=4"):
        bench.main(["--n_layer", "1", "--grid", "n_embd=30", "n_head=4", "--dry_run"])


def test_cli_help_and_bad_grid_key(tmp_path):
    from gpt2fit.options import fields_of

    r = run_cli("bench", "--help", cwd=tmp_path)
    assert r.returncode == 0
    names = list(fields_of(bench.SECTIONS)) + ["grid"]
    assert len(names) >= 40  # the train options of the step, the bench's own, --grid
    for name in names:
        assert f"--{name}" in r.stdout, name
    r = run_cli("bench", "--n_layer", "1", "--grid", "optimzer=adamw", "grad_checkpoint=true", cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    first = r.stderr.splitlines()[0]
    assert first.startswith("error: unknown grid key 'optimzer'") and "Did you mean 'optimizer'" in first
    assert not (tmp_path / "benchmarks").exists()  # nothing ran, nothing written


def test_cells_are_the_train_configs_of_their_options(capsys):
    # a train option is a flag (fixed for every cell) and a grid key; each cell is a checked TrainConfig
    assert bench.main(["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--compile", "true",
                       "--mixed_precision", "no", "--grid", "loss_chunk_size=0,256", "--dry_run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and all("compile=True" in x and "mixed_precision=no" in x for x in lines)
    assert "loss_chunk_size=256" in lines[1]
    cfg = bench.cell_config({"preset": "gpt2", "loss_chunk_size": 256, "optimizer": "adamw8bit"}, 5)
    assert (cfg.model.loss_chunk_size, cfg.optim.optimizer, cfg.run.max_steps) == (256, "adamw8bit", 5)
    with pytest.raises(UserError, match="nan.*not a finite number"):
        bench.main(["--grid", "learning_rate=nan", "--dry_run"])
    with pytest.raises(UserError, match="warmup=0 must be a positive integer"):
        bench.main(["--warmup", "0", "--dry_run"])


def test_random_data_dir_is_a_prepared_data_dir(tmp_path):
    from gpt2fit import formats
    from gpt2fit.prepare.tokenizers import fingerprint, load_tokenizer

    d = bench.write_random_data_dir(tmp_path / "d", 300, 1000, seed=1, block_size=16)
    meta = formats.read_meta(d)
    assert meta["tokenizer"]["vocab_size"] == 300 and meta["format_version"] == formats.META_FORMAT_VERSION
    assert meta["tokenizer"]["fingerprint"] == fingerprint(load_tokenizer(str(d / formats.TOKENIZER_DIR)))
    train = formats.open_split(d, "train", meta)
    assert len(train) == meta["splits"]["train"]["tokens"] == 1000 and int(train.max()) < 300
