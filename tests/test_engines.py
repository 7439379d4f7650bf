"""Accelerate's engines from the same scripts/train.py, only --config_file changed: DeepSpeed ZeRO-2
and ZeRO-3 with CPU offload on two CPU processes (DeepSpeed's CPU accelerator over gloo), against
DDP on two CPU processes. FSDP2 runs on GPUs only (Accelerate 1.16 turns it into DDP under use_cpu),
so here only its refusal is tested; a GPU runs it in benchmarks/gpu/."""

import importlib.util
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, read_rows, tiny_flags

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs pip install deepspeed")]

CONFIGS = ROOT / "accelerate_configs"
FLAGS = dict(max_steps=6, grad_accum_steps=2, eval_interval=3, checkpoint_interval=3, keep_checkpoints=3)
_port = iter(range(29541, 29600))


def launch(data, out, *launcher, script=None, env=None, **over):
    """`accelerate launch LAUNCHER --num_processes 2 scripts/train.py FLAGS` in fresh processes."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", **(env or {}))  # CPU processes
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(next(_port)),
           str(script or ROOT / "scripts/train.py"), *tiny_flags(data, out, **{**FLAGS, **over})]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=e)


def ok(p):
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    return p


def weights(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "final/model.safetensors")


@pytest.fixture(scope="module")
def ddp(char_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "run"
    ok(launch(char_data, out, "--multi_gpu", "--dynamo_backend", "no", env={"ACCELERATE_USE_CPU": "true"}))
    return out


@pytest.mark.parametrize("config", ["deepspeed_zero2.yaml", "deepspeed_zero3_offload.yaml"])
def test_deepspeed_trains_like_ddp_resumes_exactly_and_exports(char_data, ddp, tmp_path, config):
    from transformers import AutoModelForCausalLM

    run, cut = tmp_path / "run", tmp_path / "cut"
    p = ok(launch(char_data, run, "--config_file", str(CONFIGS / config)))
    assert "x 2 processes = 512 tokens per optimizer step" in p.stdout
    # DeepSpeed's engine really ran (not DDP): its checkpoint format, states sharded over both ranks
    shards = sorted(f.name for f in (run / "checkpoints/step_00000006/pytorch_model").iterdir())
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in shards, shards
    rows, ref = read_rows(run), read_rows(ddp)
    assert [r["step"] for r in rows] == list(range(1, 7)) and rows[-1]["tokens"] == 6 * 512
    # the same token-weighted accumulation: DDP's losses and gradient norms within fp32 summation noise
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref], rel=1e-5)
    assert [r["grad_norm"] for r in rows] == pytest.approx([r["grad_norm"] for r in ref], rel=1e-4)
    assert [r["val_loss"] for r in read_rows(run, "eval")] == pytest.approx(
        [r["val_loss"] for r in read_rows(ddp, "eval")], rel=1e-5)
    # final/ holds the full weights gathered from the shards, and loads with stock transformers
    model = AutoModelForCausalLM.from_pretrained(run / "final")
    assert sum(t.numel() for t in model.parameters()) == sum(t.numel() for t in
                                                             AutoModelForCausalLM.from_pretrained(ddp / "final").parameters())
    mine, theirs = weights(run), weights(ddp)
    for k, v in theirs.items():
        torch.testing.assert_close(mine[k], v, rtol=1e-4, atol=1e-5)
    # killed after step 3: --resume auto continues exactly as the uninterrupted run
    shutil.copytree(run, cut)
    shutil.rmtree(cut / "checkpoints/step_00000006")
    shutil.rmtree(cut / "final")
    p = ok(launch(char_data, cut, "--config_file", str(CONFIGS / config), resume="auto"))
    assert "resuming from" in p.stdout and "at step 3" in p.stdout
    assert [r["loss"] for r in read_rows(cut)] == [r["loss"] for r in rows]
    assert [r["grad_norm"] for r in read_rows(cut)] == [r["grad_norm"] for r in rows]
    assert all(torch.equal(v, weights(run)[k]) for k, v in weights(cut).items())


POISON = """
import sys
import torch
from gpt2fit.cli import main
from gpt2fit.train.model import CausalLM

orig, calls = CausalLM.forward, [0]


def forward(self, x, y):  # NaN loss on the first micro-batch of optimizer step 3 (2 per step)
    out = orig(self, x, y)
    if torch.is_grad_enabled():
        calls[0] += 1
        out = out * float("nan") if calls[0] == 5 else out
    return out


CausalLM.forward = forward
sys.exit(main(["train", *sys.argv[1:]]))
"""


def test_nonfinite_step_is_skipped_under_deepspeed(char_data, tmp_path):
    """DeepSpeed clips and steps inside backward; its own check skips the NaN update, and the loop
    counts and logs the skip as it does without an engine."""
    script = tmp_path / "poisoned_train.py"
    script.write_text(POISON)
    run = tmp_path / "run"
    p = ok(launch(char_data, run, "--config_file", str(CONFIGS / "deepspeed_zero2.yaml"), script=script,
                  max_nonfinite_steps=3))
    assert "step 3: non-finite loss or gradient norm; update skipped (1 in a row)" in p.stdout
    assert [(r["step"], r["consecutive"]) for r in read_rows(run, "skip")] == [(3, 1)]
    losses = [r["loss"] for r in read_rows(run)]
    assert math.isnan(losses[2]) and not any(math.isnan(v) for i, v in enumerate(losses) if i != 2)
    # Adam took 5 steps in 6 (DeepSpeed's checkpoint is pickled: trusted here, we just wrote it)
    state = torch.load(run / "checkpoints/step_00000006/pytorch_model/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]["base_optimizer_state"]["state"]
    assert {float(s["step"]) for s in state.values()} == {5.0}
    assert all(torch.isfinite(t).all() for t in weights(run).values())


@pytest.mark.parametrize("config, extra, message", [
    ("deepspeed_zero2.yaml", {"optimizer": "adamw8bit"},
     "error: optimizer=adamw8bit runs on one device or under DDP (multi_gpu.yaml), not DeepSpeed"),
    ("deepspeed_zero2.yaml", {"optimizer": "muon"},
     "error: optimizer=muon runs on one device or under DDP (multi_gpu.yaml), not DeepSpeed"),
    ("fsdp2.yaml", {}, "error: 2 processes but Accelerate set up no engine to join them (it runs FSDP on GPUs only)"),
])
def test_combinations_that_cannot_run_fail_at_start(char_data, tmp_path, config, extra, message):
    run = tmp_path / "run"
    p = launch(char_data, run, "--config_file", str(CONFIGS / config), **extra)
    assert p.returncode != 0 and message in p.stderr, p.stderr[-3000:]
    assert not run.exists()  # refused before anything was written
