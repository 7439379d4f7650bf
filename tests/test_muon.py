"""--optimizer muon: which parameters Muon takes, how it treats GPT-2's fused Q/K/V matrix, that the
LR schedule reaches both inner optimizers (also after Accelerate and a resume replaced their groups),
the planner's state bytes against what the optimizer allocates, and that every DDP rank takes the
same update. Exact resume is in test_resilience (SIGKILLs, bitwise, as for AdamW)."""

import json
import os

import pytest
import torch
from accelerate import Accelerator
from transformers import GPT2Config, GPT2LMHeadModel

from conftest import read_rows
from gpt2fit.config import OptimArgs
from gpt2fit.errors import UserError
from gpt2fit.plan.memory import _optimizer_bytes, estimate_memory, param_tensors
from gpt2fit.train.model import CausalLM
from gpt2fit.train.optim import build_optimizer, build_scheduler
from test_engines import launch, ok

C = 32
SHAPE = dict(n_layer=2, n_head=2, n_embd=C, n_positions=16, vocab_size=64)


def tiny(seed=0):
    torch.manual_seed(seed)
    return CausalLM(GPT2LMHeadModel(GPT2Config(**SHAPE)))


def muon(**over):
    return OptimArgs(**{"optimizer": "muon", "learning_rate": 1e-3, **over})


def test_muon_takes_the_block_matrices_and_adamw_everything_else():
    model = tiny()
    opt = build_optimizer(model, muon(), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    in_adamw = sorted(names[id(p)] for g in opt.adamw.param_groups for p in g["params"])
    assert in_muon == sorted(f"lm.transformer.h.{i}.{m}.weight" for i in range(2)
                             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    # the tied embedding / LM head, the position embedding, LayerNorms and biases; each parameter once
    assert "lm.transformer.wte.weight" in in_adamw and "lm.transformer.wpe.weight" in in_adamw
    assert all(n.endswith("bias") or ".ln_" in n or "wte" in n or "wpe" in n for n in in_adamw)
    assert sorted(in_muon + in_adamw) == sorted(names.values())
    # AdamW keeps its weight decay split (embeddings decay, LayerNorms/biases/wpe do not)
    decayed = {names[id(p)] for g in opt.adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {"lm.transformer.wte.weight"}
    assert [g["lr"] for g in opt.param_groups] == [1e-3] * 3
    assert build_optimizer(model, muon(muon_learning_rate=0.02), "cpu").muon.param_groups[0]["lr"] == 0.02
    given = build_optimizer(model, muon(muon_weight_decay=0.0, muon_momentum=0.0), "cpu").muon.param_groups[0]
    assert (given["weight_decay"], given["momentum"], given["nesterov"]) == (0.0, 0.0, True)  # 0 is not "unset"
    default = opt.muon.param_groups[0]
    assert (default["weight_decay"], default["momentum"], default["adjust_lr_fn"]) == (0.1, 0.95, "match_rms_adamw")


def test_c_attn_is_orthogonalized_as_one_matrix_not_three():
    """With momentum 0 and no decay the update is lr * 0.2*sqrt(max(C, 3C)) * NS(grad) for the (C, 3C)
    Q|K|V matrix: its singular values are near 1 as one matrix, so each of Q, K, V alone has an RMS
    singular value near 1/sqrt(3) (orthogonalized separately each would be near 1)."""
    model = tiny()
    lr = 1e-3
    opt = build_optimizer(model, muon(learning_rate=lr, muon_weight_decay=0.0, muon_momentum=0.0), "cpu")
    w = model.lm.transformer.h[0].attn.c_attn.weight
    assert w.shape == (C, 3 * C)  # Conv1D: (in, out), Q, K, V side by side
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = w.detach().clone()
    opt.step()
    update = (before - w.detach()) / (lr * 0.2 * (3 * C) ** 0.5)
    s = torch.linalg.svdvals(update.double())
    assert 0.5 < s.min() and s.max() < 1.5, s  # Newton-Schulz's band (torch docs: ~Uniform(0.5, 1.5))
    rms = [torch.linalg.svdvals(update[:, k * C:(k + 1) * C].double()).square().mean().sqrt() for k in range(3)]
    assert all(0.4 < r < 0.75 for r in rms), rms


def test_schedule_reaches_both_optimizers_after_prepare_and_a_state_dict_load():
    """Accelerate's prepare and every resume call load_state_dict, which replaces torch's group dicts:
    the warmup and cosine must still reach Muon's and AdamW's groups."""
    model = tiny()
    o = muon(muon_learning_rate=0.02, warmup_steps=4, min_lr=1e-4)
    opt = build_optimizer(model, o, "cpu")
    sched = build_scheduler(opt, o, total_steps=10)
    model, opt, sched = Accelerator(cpu=True).prepare(model, opt, sched)
    inner = opt.optimizer
    inner.load_state_dict(inner.state_dict())
    x = torch.randint(0, 64, (2, 16))
    seen = []
    for _ in range(6):
        model(x, x).backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        seen.append((inner.muon.param_groups[0]["lr"], inner.adamw.param_groups[0]["lr"]))
    assert [round(m / a, 9) for m, a in seen] == [20.0] * 6  # both follow the same multiplier
    assert seen[3][0] == pytest.approx(0.02) and seen[5][0] < seen[3][0]  # warmup done after 4 steps, then decay
    assert inner.param_groups[0] is inner.muon.param_groups[0]


def test_state_bytes_are_what_the_planner_counts_and_under_0_6x_adamw_for_gpt2_medium():
    def state_bytes(opt):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                   if torch.is_tensor(t) and t.dim() > 0)  # (not AdamW's 0-d step counters)

    x = torch.randint(0, 64, (2, 16))
    for name in ("muon", "adamw"):
        model = tiny()
        opt = build_optimizer(model, OptimArgs(optimizer=name), "cpu")
        model(x, x).backward()
        opt.step()
        assert state_bytes(opt) == _optimizer_bytes(param_tensors(GPT2Config(**SHAPE)), name)[0], name
    ratio = estimate_memory("gpt2-medium", optimizer="muon").optimizer / estimate_memory("gpt2-medium").optimizer
    assert ratio <= 0.6, ratio


def test_step_runs_a_closure_with_gradients_and_returns_its_loss():
    model = tiny()
    opt = build_optimizer(model, muon(), "cpu")
    x = torch.randint(0, 64, (2, 16))
    before = model.lm.transformer.h[0].mlp.c_fc.weight.detach().clone()

    def closure():
        opt.zero_grad()
        loss = model(x, x)
        loss.backward()
        return loss

    assert torch.isfinite(opt.step(closure))
    assert not torch.equal(before, model.lm.transformer.h[0].mlp.c_fc.weight)


def test_a_model_without_block_matrices_is_refused():
    with pytest.raises(UserError, match="--optimizer muon found no 2-D weights inside transformer blocks"):
        build_optimizer(torch.nn.Sequential(torch.nn.Linear(4, 4)), muon(), "cpu")


CHECKSUMS = """
import json, os, sys
import torch
from gpt2fit.cli import main
from gpt2fit.train import optim

step = optim.MuonWithAdamW.step


def checked(self, closure=None):  # after every update: this rank's weights, bit for bit
    out = step(self, closure)
    digest = [float(p.double().sum()) for g in self.param_groups for p in g["params"]]
    with open(os.environ["SUMS"] + os.environ["RANK"], "a") as f:
        f.write(json.dumps(digest) + "\\n")
    return out


optim.MuonWithAdamW.step = checked
sys.exit(main(["train", *sys.argv[1:]]))
"""


@pytest.mark.slow
def test_every_ddp_rank_takes_the_same_muon_update(char_data, tmp_path):
    script = tmp_path / "checksums.py"
    script.write_text(CHECKSUMS)
    run, sums = tmp_path / "run", tmp_path / "sums."
    ok(launch(char_data, run, "--multi_gpu", "--dynamo_backend", "no", script=script, optimizer="muon",
              env={"ACCELERATE_USE_CPU": "true", "SUMS": str(sums)}))
    ranks = [[json.loads(line) for line in open(f"{sums}{r}")] for r in (0, 1)]
    assert len(ranks[0]) == 6 and ranks[0] == ranks[1]
    assert ranks[0][0] != ranks[0][-1]
    losses = [r["loss"] for r in read_rows(run)]
    assert losses[-1] < losses[0]
    assert os.path.isfile(run / "final" / "model.safetensors")


def test_plan_projects_the_measured_token_saving_only_for_muon():
    from conftest import ROOT
    from gpt2fit.plan.planner import plan_run

    bench = [ROOT / "benchmarks"]
    muon_plan = plan_run("gpt2", gpu="rtx-4070", optimizer="muon", loss_chunk_size=4096, max_tokens="10B",
                         bench_dirs=bench)
    frac = json.loads((ROOT / "benchmarks/time_to_quality/result.json").read_text())["summary"]["token_fraction"]
    note = next(n for n in muon_plan.notes if n.startswith("projection: "))
    assert f"in {frac:.2f}x its tokens" in note and f"~{frac * 10:.2f}B tokens" in note
    adamw_plan = plan_run("gpt2", gpu="rtx-4070", optimizer="adamw", max_tokens="10B", bench_dirs=bench)
    assert not any(n.startswith("projection") for n in adamw_plan.notes)
