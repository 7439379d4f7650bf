"""End-to-end training on a tiny model (CPU, fp32): the contracts of the loop and the run dir."""

import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, read_rows, run_cli, tiny_flags
from gpt2fit.train.command import main as train_main


def train(data, out, **over) -> int:
    return train_main(tiny_flags(data, out, **over))


def test_loss_falls_and_run_dir_contract(char_data, tmp_path):
    out = tmp_path / "run"
    assert train(char_data, out, max_steps=60, eval_interval=30, checkpoint_interval=30, micro_batch_size=8) == 0
    rows = read_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 61))
    for key in ("step", "tokens", "loss", "lr", "tokens_per_s", "mfu", "peak_mem_bytes"):
        assert key in rows[0]
    evals = read_rows(out, "eval")
    assert [e["step"] for e in evals] == [30, 60]
    start, end = rows[0]["loss"], sum(r["loss"] for r in rows[-5:]) / 5
    assert start > math.log(60) * 0.9 and end < start - 1.0, (start, end)
    assert evals[-1]["val_loss"] < start - 1.0
    assert (out / "config.yaml").is_file() and (out / "summary.json").is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000030", "step_00000060"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 60


def test_final_loads_with_stock_transformers_and_generates(char_data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    out = tmp_path / "run"
    assert train(char_data, out, max_steps=5) == 0
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "generation_config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    text = gen("def ", max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert text.startswith("def ") and len(text) > 4
    # the exported weights are the trained ones: the same windows give the last eval row's val loss
    from gpt2fit.evaluate.perplexity import HFLossSum, windowed_loss
    from gpt2fit.formats import open_split

    val = windowed_loss(HFLossSum(model), open_split(char_data, "val"), 32, batch_size=4, max_windows=4 * 4)
    assert val["loss"] == pytest.approx(read_rows(out, "eval")[-1]["val_loss"], rel=1e-5)


def test_grad_accumulation_equals_larger_batch(char_data, tmp_path):
    """4 micro-batches of 2 == 1 micro-batch of 8: same loss and same weights (fp32)."""
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    assert train(char_data, a, max_steps=3, micro_batch_size=2, grad_accum_steps=4) == 0
    assert train(char_data, b, max_steps=3, micro_batch_size=8, grad_accum_steps=1) == 0
    ra, rb = read_rows(a), read_rows(b)
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-5)
    # Adam is blind to the gradient's scale, so check the scale itself: the global grad norm
    assert [r["grad_norm"] for r in ra] == pytest.approx([r["grad_norm"] for r in rb], rel=1e-5)
    wa, wb = load_file(a / "final/model.safetensors"), load_file(b / "final/model.safetensors")
    for k in wa:  # 3 Adam steps at lr 1e-2: summation-order noise stays far below one step (1e-2)
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("host_sync", ["step", "log"])
def test_resume_continues_with_identical_losses(char_data, tmp_path, host_sync):
    full, cut = tmp_path / "full", tmp_path / "cut"
    flags = dict(max_steps=12, checkpoint_interval=4, dropout=0.1, keep_checkpoints=5, host_sync=host_sync)
    assert train(char_data, full, **flags) == 0
    assert train(char_data, cut, **flags) == 0
    # pretend the run died after step 8: drop the later checkpoints and outputs
    shutil.rmtree(cut / "checkpoints/step_00000012")
    shutil.rmtree(cut / "final")
    assert train(char_data, cut, resume="auto", **flags) == 0
    assert [r["loss"] for r in read_rows(cut)] == [r["loss"] for r in read_rows(full)]
    assert [r["step"] for r in read_rows(cut)] == list(range(1, 13))


@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_compiled_run_matches_eager_exports_its_weights_and_resumes(char_data, tmp_path, scope, capsys):
    """--compile with inductor (whole model, or Accelerate's per-block regional compilation) on the
    CPU: the losses are eager's within fp32 noise, final/ holds the trained weights under their plain
    names (not torch.compile's "_orig_mod." ones), and a resumed compiled run continues the same."""
    from safetensors.torch import load_file

    eager, comp, cut = tmp_path / "eager", tmp_path / "compiled", tmp_path / "cut"
    flags = dict(max_steps=4, checkpoint_interval=2, eval_interval=4, keep_checkpoints=3)
    assert train(char_data, eager, **flags) == 0
    on = dict(compile="true", compile_scope=scope, **flags)
    capsys.readouterr()
    assert train(char_data, comp, **on) == 0
    assert f"compile inductor (mode default, {'per block' if scope == 'blocks' else 'whole model'})" \
        in capsys.readouterr().out
    losses = [r["loss"] for r in read_rows(comp)]
    assert losses == pytest.approx([r["loss"] for r in read_rows(eager)], rel=1e-4)
    final = load_file(comp / "final/model.safetensors")
    last = load_file(comp / "checkpoints/step_00000004/model.safetensors")
    assert final and all(torch.equal(v, last["lm." + k]) for k, v in final.items())
    assert not torch.equal(final["transformer.h.0.mlp.c_fc.weight"],
                           load_file(comp / "checkpoints/step_00000002/model.safetensors")["lm.transformer.h.0.mlp.c_fc.weight"])
    shutil.copytree(comp, cut)
    shutil.rmtree(cut / "checkpoints/step_00000004")
    shutil.rmtree(cut / "final")
    assert train(char_data, cut, resume="auto", **on) == 0
    assert [r["loss"] for r in read_rows(cut)] == pytest.approx(losses, rel=1e-6)


def test_eight_bit_optimizer_runs_and_keeps_embedding_state_32bit(char_data, tmp_path):
    import bitsandbytes as bnb

    out = tmp_path / "run"
    assert train(char_data, out, max_steps=30, optimizer="adamw8bit", n_embd=256, n_head=4) == 0
    rows = read_rows(out)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert bnb.optim.GlobalOptimManager.get_instance().pid2config, "embedding override registered"


def test_token_budget_and_epochs_set_the_run_length(char_data, tmp_path):
    from gpt2fit.config import parse_config
    from gpt2fit.train.loop import setup

    cfg, _ = parse_config(tiny_flags(char_data, tmp_path / "a", max_steps=None, max_tokens="1.28k"))
    run = setup(cfg)
    assert run.tokens_per_step == 4 * 32 and run.total_steps == 10


@pytest.mark.slow
def test_two_process_cpu_run_through_accelerate_launch(char_data, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           "29517", str(ROOT / "scripts/train.py"), *tiny_flags(char_data, out, max_steps=6,
                                                                 grad_accum_steps=2, eval_interval=3)]
    import subprocess

    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "x 2 processes = 512 tokens per optimizer step" in p.stdout
    rows = read_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["tokens"] == 6 * 512
    assert (out / "final/model.safetensors").is_file()


# --- bad input: a clear first line, exit 2, nothing earlier damaged ----------------------------
def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def good_run(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("good") / "run"
    assert train_main(tiny_flags(char_data, out, max_steps=4)) == 0
    return out


def test_bad_inputs_fail_fast_and_leave_earlier_run_intact(char_data, good_run, tmp_path):
    before = _snapshot(good_run)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (tiny_flags(tmp_path / "nope", good_run), "data_dir"),
        (tiny_flags(empty, good_run), "meta.json is missing"),
        (tiny_flags(char_data, good_run), "already holds a run; pass --resume auto"),
        (tiny_flags(char_data, good_run, block_size=4096, max_steps=2), "already holds a run"),
        (["quickstrat"], "unknown recipe 'quickstrat'"),
        (tiny_flags(char_data, good_run, n_embd="3.5"), "n_embd='3.5'"),
        (tiny_flags(char_data, good_run, resume="auto", n_layer=3), "model shape changed (n_layer: 2 -> 3)"),
    ]
    for argv, message in cases:
        p = run_cli("train", *argv)
        assert p.returncode == 2, (argv, p.stderr)
        first = p.stderr.strip().splitlines()[0]
        assert first.startswith("error: ") and message in first, (message, p.stderr)
    assert _snapshot(good_run) == before


def test_block_size_above_init_from_positions_and_vocab_mismatch(char_data, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "base"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=16, vocab_size=300)).save_pretrained(base)
    p = run_cli("train", *tiny_flags(char_data, tmp_path / "r1", n_layer=None, n_head=None, n_embd=None,
                                     init_from=base, block_size=32))
    assert p.returncode == 2 and "block_size=32 exceeds" in p.stderr and "n_positions=16" in p.stderr
    small = tmp_path / "small"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=20)).save_pretrained(small)
    p = run_cli("train", *tiny_flags(char_data, tmp_path / "r2", init_from=small))
    assert p.returncode == 2 and "vocab" in p.stderr.splitlines()[0]
    assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_periodic_hellaswag_rows(char_data, tmp_path):
    fixture = Path(__file__).parent / "fixtures/hellaswag_tiny.jsonl"
    out = tmp_path / "run"
    assert train(char_data, out, max_steps=4, eval_interval=2, hellaswag=fixture, hellaswag_examples=4,
                 block_size=128) == 0  # char-level endings reach 127 tokens
    rows = read_rows(out, "hellaswag")
    assert [r["step"] for r in rows] == [2, 4] and all(r["n"] == 4 for r in rows)
    # the last row is the final model's score on the same fixed subset, computed independently here
    from gpt2fit.evaluate.hellaswag import hellaswag_subset, load_hellaswag, score_hellaswag
    from gpt2fit.evaluate.model import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(str(out), device="cpu")
    res = score_hellaswag(model, tok, hellaswag_subset(load_hellaswag(fixture), 4, seed=7))
    assert (rows[-1]["acc"], rows[-1]["acc_norm"]) == (res["acc"], res["acc_norm"])


def test_tensorboard_tracker_writes_events(char_data, tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run"
    assert train(char_data, out, max_steps=3, report_to="auto") == 0  # the default: on when installed
    events = list(out.rglob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
