import pytest
import torch

from conftest import tiny_flags
from gpt2fit.train.autobatch import probe_micro_batch
from gpt2fit.errors import UserError


def test_probe_backs_off_on_out_of_memory_to_the_largest_that_runs():
    tried = []

    def step(b):  # stands in for a CUDA step: this CPU has no device memory to exhaust
        tried.append(b)
        if b > 13:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert probe_micro_batch(step, 20) == 13
    assert tried[:5] == [20, 18, 16, 14, 12] and tried[-1] == 13  # 10% back-off, then bisect
    tried.clear()
    assert probe_micro_batch(step, 9) == 9 and tried == [9]  # the estimate runs: taken as is


def test_probe_reports_when_nothing_fits():
    def step(b):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    with pytest.raises(UserError, match="even micro_batch_size=1 runs out of memory"):
        probe_micro_batch(step, 4)


def test_auto_micro_batch_on_cpu_uses_the_planner_and_keeps_tokens_per_step(char_data, tmp_path):
    from gpt2fit.config import parse_config
    from gpt2fit.train.loop import setup

    cfg, _ = parse_config(tiny_flags(char_data, tmp_path / "run", micro_batch_size="auto",
                                     tokens_per_step=8192))
    run = setup(cfg)
    assert run.micro == 64  # capped on the CPU
    assert run.accum == 4 and run.tokens_per_step == 64 * 32 * 4


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_probe_step_runs_two_full_steps_and_leaves_the_weights_alone(char_data, tmp_path, monkeypatch, optimizer):
    """The CUDA probe's step, run on the CPU: two forward/backward/optimizer steps (the second
    backward must find the optimizer states already allocated, as in training), at lr 0 (with muon,
    Muon's and AdamW's groups both)."""
    from accelerate import Accelerator

    from gpt2fit.train import autobatch as autobatch
    from gpt2fit.config import parse_config
    from gpt2fit.train.model import CausalLM, build_model

    cfg, _ = parse_config(tiny_flags(char_data, tmp_path / "run", dropout=0.1, optimizer=optimizer))
    model = CausalLM(build_model(cfg.model, 100, seed=0, eot_id=99))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps = []
    real = torch.optim.AdamW.step

    def counting_step(self, *a, **kw):
        steps.append(sum(len(s) for s in self.state.values()))  # states held when this step starts
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    autobatch._try_step(cfg, model, Accelerator(cpu=True), 3)
    assert len(steps) == autobatch.PROBE_STEPS == 2 and steps[0] == 0 and steps[1] > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
