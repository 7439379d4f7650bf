"""The planner: parameter counts, parsing, the memory model (checked against CPU measurements),
the micro-batch / accumulation arithmetic and the `gpt2fit plan` CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2fit.errors import UserError
from gpt2fit.hardware import GPUS, device_peak_flops, flops_per_token, gpu_key_for_device, resolve_gpu
from gpt2fit.plan import memory as plan
from gpt2fit.plan.memory import count_params, count_params_for_flops, estimate_memory, max_micro_batch
from gpt2fit.plan.planner import format_plan, lookup_mfu, main, plan_run
from gpt2fit.units import parse_count, parse_size

REPO = Path(__file__).resolve().parents[1]
GiB = 1024**3


# --- parameter counts and FLOPs -----------------------------------------------------------


def test_param_counts_are_exact():
    assert count_params("gpt2") == 124_439_808
    assert count_params("gpt2-medium") == 354_823_168
    assert count_params("gpt2-large") == 774_030_080
    assert count_params("gpt2-xl") == 1_557_611_200


def test_param_count_matches_a_real_hf_model_and_config_objects():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=3, n_head=4, n_embd=64, n_positions=96, vocab_size=517, n_inner=200)
    model = GPT2LMHeadModel(cfg)
    assert count_params(cfg) == sum(p.numel() for p in model.parameters())
    assert count_params(cfg.to_dict()) == count_params(cfg)  # config.json dicts too
    untied = GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=16, vocab_size=50, tie_word_embeddings=False)
    assert count_params(untied) == count_params(GPT2Config(**{**untied.to_dict(), "tie_word_embeddings": True})) + 50 * 32


def test_flops_count_follows_nanogpt():
    assert count_params_for_flops("gpt2") == 124_439_808 - 1024 * 768  # all but wpe
    n = count_params_for_flops("gpt2")
    assert flops_per_token(n, 12, 768, 1024) == 6 * n + 12 * 12 * 768 * 1024
    assert 8.5e8 < flops_per_token(n, 12, 768, 1024) < 8.6e8


# --- parsing ------------------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("12GiB", 12 * GiB), ("12GB", 12 * 10**9), ("11.5G", int(11.5 * GiB)), ("800MiB", 800 * 1024**2),
    ("800MB", 800 * 10**6), ("12884901888", 12884901888), ("12 gib", 12 * GiB), ("1.5T", int(1.5 * 1024**4)),
    ("512K", 512 * 1024), ("100B", 100), (4096, 4096),
])
def test_parse_size(text, want):
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "GB", "twelve", "12XB", "-1G", "0", "12G B", "1.2.3G", "0.1b"])
def test_parse_size_rejects_with_the_value_and_forms(bad):
    with pytest.raises(UserError) as e:
        parse_size(bad)
    msg = str(e.value)
    assert repr(bad) in msg or str(bad) in msg
    assert "GiB" in msg and "GB" in msg


@pytest.mark.parametrize("text,want", [
    ("10B", 10 * 10**9), ("2.5M", 2_500_000), ("300k", 300_000), ("1e9", 10**9), ("491520", 491520),
    ("1_000_000", 10**6), ("0.5M", 500_000), ("1.5e3", 1500), (42, 42), ("0", 0),
])
def test_parse_count(text, want):
    assert parse_count(text) == want


@pytest.mark.parametrize("bad", ["", "ten", "1.5", "2.5e-1", "10X", "-5", "1e", "0.5"])
def test_parse_count_rejects_with_the_value(bad):
    with pytest.raises(UserError) as e:
        parse_count(bad)
    assert repr(bad) in str(e.value) or bad in str(e.value)


# --- GPUs -----------------------------------------------------------------------------------


def test_every_gpu_row_is_found_by_its_name():
    # the table and the device-name patterns agree: a row's name, as torch reports it, finds that row
    for key, gpu in GPUS.items():
        assert resolve_gpu(key) == (key, gpu)
        assert gpu_key_for_device("NVIDIA " + gpu.name) == key, gpu.name
    # one convention for all GeForce cards: half-rate FP32-accumulate, so 4090 / 4070 ~ SMs x clock
    ratio = GPUS["rtx-4090"].bf16_dense_flops / GPUS["rtx-4070"].bf16_dense_flops
    assert ratio == pytest.approx((128 * 2.52) / (46 * 2.475), rel=0.01)


@pytest.mark.parametrize("name,key", [
    ("NVIDIA H100 80GB HBM3", "h100-80gb"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb"), ("NVIDIA GeForce RTX 4070", "rtx-4070"),
    ("NVIDIA GeForce RTX 4070 Ti", "rtx-4070-ti"), ("NVIDIA GeForce RTX 4090", "rtx-4090"),
    ("NVIDIA GeForce RTX 3090", "rtx-3090"), ("NVIDIA GeForce RTX 3060", "rtx-3060"),
])
def test_device_peak_flops_known(name, key):
    assert device_peak_flops(name) == GPUS[key].bf16_dense_flops


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4070 SUPER", "NVIDIA GeForce RTX 4070 Ti SUPER",
                                  "NVIDIA GeForce RTX 4090 Laptop GPU", "NVIDIA H100 NVL", "Tesla T4", "cpu", ""])
def test_device_peak_flops_unknown(name):
    assert device_peak_flops(name) is None


# --- the memory model ------------------------------------------------------------------------

COMBOS = [dict(grad_checkpointing=ck, optimizer=opt, loss_chunk_size=chunk, mixed_precision=prec)
          for ck in (False, True) for opt in ("adamw", "adamw8bit") for chunk in (0, 1024)
          for prec in ("bf16", "no")]


@pytest.mark.parametrize("kw", COMBOS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_memory_grows_with_micro_batch(kw):
    totals = [estimate_memory("gpt2-medium", micro_batch_size=b, **kw) for b in (1, 2, 3, 8, 32)]
    for a, b in zip(totals, totals[1:]):
        assert b.activations > a.activations
        assert b.total >= a.total and b.forward_backward > a.forward_backward
        assert (b.weights, b.gradients, b.optimizer) == (a.weights, a.gradients, a.optimizer)


def test_checkpointing_reduces_activations():
    for model in ("gpt2", "gpt2-medium", "gpt2-xl"):
        off = estimate_memory(model, micro_batch_size=4, grad_checkpointing=False)
        on = estimate_memory(model, micro_batch_size=4, grad_checkpointing=True)
        assert on.activations < off.activations / 4


def test_8bit_reduces_optimizer_bytes_and_keeps_the_embedding_32bit():
    adam = estimate_memory("gpt2", optimizer="adamw").optimizer
    bnb = estimate_memory("gpt2", optimizer="adamw8bit").optimizer
    paged = estimate_memory("gpt2", optimizer="paged_adamw8bit").optimizer
    assert adam == 8 * count_params("gpt2")
    assert bnb == paged < adam / 2
    wte = 50257 * 768
    rest = count_params("gpt2") - wte
    assert 8 * wte + 2 * rest < bnb < 8 * wte + 2.1 * rest


def test_chunked_loss_reduces_logits():
    for b in (1, 4, 16):
        plain = estimate_memory("gpt2", micro_batch_size=b, loss_chunk_size=0)
        chunked = estimate_memory("gpt2", micro_batch_size=b, loss_chunk_size=1024)
        assert chunked.logits < plain.logits
    plain = estimate_memory("gpt2", micro_batch_size=8)
    assert plain.logits >= 12 * 8 * 1024 * 50257  # fp32 log-softmax + two fp32 gradients


def test_mixed_precision_components():
    bf16 = estimate_memory("gpt2", mixed_precision="bf16")
    fp32 = estimate_memory("gpt2", mixed_precision="no")
    n = count_params("gpt2")
    assert fp32.weights == 4 * n
    assert 5 * n < bf16.weights < 6 * n  # fp32 master + 16-bit autocast copies of matmul weights
    assert bf16.gradients == fp32.gradients == 4 * n
    assert bf16.activations < fp32.activations
    assert estimate_memory("gpt2", n_processes=2).gradients == 8 * n  # DDP buckets


def test_fused_gelu_and_dropout_terms():
    new = estimate_memory("gpt2", activation="gelu_new").activations
    fused = estimate_memory("gpt2", activation="gelu_pytorch_tanh").activations
    assert fused < new
    # per token per layer in bf16: 84C (gelu_new) vs 36C (fused), plus small per-token terms
    assert (new - fused) == 1024 * 12 * 48 * 768
    masks = estimate_memory("gpt2", dropout=0.1).activations - estimate_memory("gpt2", dropout=0.0).activations
    assert masks == 1024 * (12 * 2 * 768 + 768)


def test_fits_and_usable_memory():
    est = estimate_memory("gpt2", micro_batch_size=1)
    assert est.total == max(est.forward_backward, est.optimizer_step)
    assert est.fits(est.total + plan.CUDA_RESERVE_BYTES, margin=0.0)
    assert not est.fits(est.total + plan.CUDA_RESERVE_BYTES - 1, margin=0.0)
    assert not est.fits(est.total + plan.CUDA_RESERVE_BYTES, margin=0.1)


def test_max_micro_batch_is_the_largest_that_fits():
    mem = GPUS["rtx-4070"].memory_bytes
    kw = dict(block_size=1024, mixed_precision="bf16", optimizer="adamw", grad_checkpointing=True, loss_chunk_size=1024)
    b = max_micro_batch("gpt2", memory_bytes=mem, **kw)
    assert b >= 2
    assert estimate_memory("gpt2", micro_batch_size=b, **kw).fits(mem)
    assert not estimate_memory("gpt2", micro_batch_size=b + 1, **kw).fits(mem)
    assert max_micro_batch("gpt2-xl", memory_bytes=4 * GiB) == 0
    assert max_micro_batch("gpt2", memory_bytes=80 * GiB, limit=7) == 7


def test_bad_choices_are_user_errors():
    with pytest.raises(UserError, match="adamw8bits.*Did you mean"):
        estimate_memory("gpt2", optimizer="adamw8bits")
    with pytest.raises(UserError, match="block_size 2048"):
        estimate_memory("gpt2", block_size=2048)
    with pytest.raises(UserError, match="gpt3.*Known"):
        estimate_memory("gpt3")


def test_settings_of_a_train_config_are_its_options():
    from gpt2fit.config import parse_config

    cfg, _ = parse_config(["--preset", "gpt2", "--data_dir", "d", "--max_steps", "1", "--grad_checkpointing", "true",
                           "--optimizer", "adamw8bit", "--loss_chunk_size", "512", "--attn_implementation", "eager",
                           "--block_size", "256", "--dropout", "0.1"])
    kw = plan.memory_settings(cfg, "fp16")
    assert kw == dict(block_size=256, mixed_precision="fp16", optimizer="adamw8bit", grad_checkpointing=True,
                      loss_chunk_size=512, attn_implementation="eager", dropout=0.1)
    assert estimate_memory("gpt2", micro_batch_size=2, **kw).total > 0


# --- the formulas against CPU measurements ---------------------------------------------------


def _tiny_gpt2(activation):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=128, n_positions=128, vocab_size=1000, activation_function=activation,
                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").train()
    assert model.config._attn_implementation == "sdpa"
    return cfg, model


@pytest.mark.parametrize("activation", ["gelu_new", "gelu_pytorch_tanh"])
def test_activation_formula_matches_saved_tensors_on_cpu(activation):
    """Bytes autograd keeps during the forward of GPT2Model (fp32, SDPA), vs the formula."""
    import torch

    cfg, model = _tiny_gpt2(activation)
    B, T = 2, 128
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in param_storages:
            kept[s.data_ptr()] = s.nbytes()  # unique storages: views count once
        return t

    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.transformer(input_ids=ids, use_cache=False)  # training must not build a KV cache
    measured = sum(kept.values())
    predicted = estimate_memory(cfg, micro_batch_size=B, block_size=T, mixed_precision="no",
                                activation=activation).activations
    assert predicted == pytest.approx(measured, rel=0.03), (measured, predicted)


def test_planner_plans_the_model_gpt2fit_builds():
    from gpt2fit.config import ModelArgs
    from gpt2fit.plan.memory import FUSED_ACTIVATIONS, model_shape
    from gpt2fit.train.model import build_config

    for preset in ("gpt2", "gpt2-medium"):  # what train builds from a preset is what the plan counts
        built = model_shape(build_config(ModelArgs(preset=preset), 50257, 50256))
        planned = model_shape(preset)
        assert (built.n_layer, built.n_head, built.n_embd, built.vocab_size) == (
            planned.n_layer, planned.n_head, planned.n_embd, planned.vocab_size)
        assert built.activation == planned.activation and planned.activation in FUSED_ACTIVATIONS
        assert count_params(built) == count_params(planned)
    # a loaded model's gelu_new is swapped for the fused op, so it is planned as that
    assert model_shape({"n_layer": 2, "n_head": 2, "n_embd": 8, "vocab_size": 10,
                        "activation_function": "gelu_new"}).activation == model_shape("gpt2").activation


def _peak_bytes(fn):
    """Peak of CPU allocations while fn runs, from torch.profiler's memory events."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = prof.profiler.kineto_results.events()
        mem = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    except AttributeError:
        pytest.skip("this torch.profiler has no kineto memory events")
    cur = peak = 0
    for _, n in mem:
        cur += n
        peak = max(peak, cur)
    del torch
    return peak


@pytest.mark.parametrize("V,chunk", [(8000, 0), (8000, 64), (16384, 16)])  # 16384: over one vocab slice
@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_logits_formula_matches_profiled_peak_on_cpu(V, chunk, precision):
    import torch

    from gpt2fit.train.loss import lm_loss

    B, T, C = 2, 128, 64
    cfg = {"n_layer": 1, "n_head": 1, "n_embd": C, "n_positions": T, "vocab_size": V}
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, T, C, generator=g, requires_grad=True)
    w = torch.randn(V, C, generator=g, requires_grad=True)
    t = torch.randint(0, V, (B, T), generator=g)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = lm_loss(h, w, t, chunk_size=chunk or None)
        (loss / (B * T)).backward()

    step()  # warm up
    h.grad = w.grad = None
    measured = _peak_bytes(step)
    est = estimate_memory(cfg, micro_batch_size=B, block_size=T, mixed_precision=precision, loss_chunk_size=chunk)
    # the plain path's 16-bit weight copy is autocast's (the planner counts it in "weights")
    predicted = est.logits + (2 * V * C if precision == "bf16" and not chunk else 0)
    assert predicted == pytest.approx(measured, rel=0.03), (measured, predicted)


# --- plan_run ----------------------------------------------------------------------------------


def test_gpt2_medium_on_a_4070_gets_a_plan():
    p = plan_run("gpt2-medium", gpu="rtx-4070", block_size=1024, mixed_precision="bf16", bench_dirs=[])
    assert p.chosen is not None and p.chosen.fits
    assert p.chosen.micro_batch_size >= 1
    assert p.chosen.micro_batch_size * 1024 * p.grad_accum >= 524288
    assert (p.chosen.micro_batch_size * 1024 * (p.grad_accum - 1)) < 524288  # no wasted micro-step
    assert p.tokens_per_step == p.chosen.micro_batch_size * 1024 * p.grad_accum
    assert len(p.candidates) == 8  # checkpointing x optimizer x loss
    assert all(c.memory.fits(GPUS["rtx-4070"].memory_bytes) == c.fits for c in p.candidates)
    assert p.chosen.tokens_per_s == pytest.approx(p.chosen.mfu * GPUS["rtx-4070"].bf16_dense_flops / p.flops_per_token)
    assert p.chosen.mfu_source == "assumed"
    assert p.chinchilla_tokens == 20 * count_params("gpt2-medium")
    assert p.training_flops == pytest.approx(p.flops_per_token * p.chinchilla_tokens)


def test_fixed_settings_and_budget():
    p = plan_run("gpt2", gpu="rtx-3060", optimizer="adamw8bit", grad_checkpointing=True, loss_chunk_size=512,
                 micro_batch_size=4, tokens_per_step="0.5M", max_tokens="1B", n_processes=2, bench_dirs=[])
    assert len(p.candidates) == 1
    c = p.chosen
    assert (c.grad_checkpointing, c.optimizer, c.loss_chunk_size, c.micro_batch_size) == (True, "adamw8bit", 512, 4)
    assert p.grad_accum == math.ceil(500_000 / (4 * 1024 * 2))
    assert c.mfu_source == "assumed"
    off = plan_run("gpt2", gpu="rtx-3060", grad_checkpointing=False, optimizer="adamw8bit", loss_chunk_size=512,
                   bench_dirs=[]).chosen
    assert c.mfu < off.mfu  # recomputing the forward is not counted as model FLOPs
    assert p.time_to_budget_s == pytest.approx(1e9 / c.tokens_per_s)


def test_nothing_fits_gives_no_choice():
    p = plan_run("gpt2-xl", gpu=None, memory_bytes=6 * GiB, bench_dirs=[], engine="ddp")
    assert p.chosen is None and not any(c.fits for c in p.candidates) and p.alternatives == []
    assert "nothing fits" in format_plan(p)
    # not even an engine: each one's best is listed, and the closest says how much GPU memory it lacks
    p = plan_run("gpt2-xl", gpu=None, memory_bytes=1 * GiB, bench_dirs=[])
    assert p.chosen is None and [c.engine for c in p.alternatives] == list(plan.ENGINES[1:])
    assert not any(c.fits for c in p.alternatives)
    assert "closest: --engine fsdp2_offload at micro-batch 1 lacks" in format_plan(p)


# --- engines -----------------------------------------------------------------------------------

XL = count_params("gpt2-xl")


@pytest.mark.parametrize("engine", ["zero1", "zero2", "zero3", "fsdp2"])
def test_sharded_state_shrinks_as_one_over_processes(engine):
    est = {w: estimate_memory("gpt2-xl", engine=engine, n_processes=w) for w in (1, 2, 4, 8)}
    for w, e in est.items():
        assert e.optimizer == (12 if engine.startswith("zero") else 8) * XL // w  # master weights + AdamW / shards
    bucket = 2 * plan.DS_REDUCE_BUCKET
    if engine == "zero1":  # only the optimizer state is sharded
        assert {e.gradients for e in est.values()} == {2 * XL + bucket} and {e.weights for e in est.values()} == {2 * XL}
    if engine == "zero2":
        assert [e.gradients - bucket for e in est.values()] == [2 * XL // w for w in est]
        assert {e.weights for e in est.values()} == {2 * XL}
    if engine in ("zero3", "fsdp2"):  # the weights too, plus what is gathered to compute
        assert est[8].weights < est[4].weights < est[2].weights < est[1].weights
    assert est[8].total < est[1].total


def test_ddp_replicates_everything():
    one, four = (estimate_memory("gpt2-xl", n_processes=w) for w in (1, 4))
    assert one.optimizer == four.optimizer == 8 * XL and four.gradients == 2 * one.gradients  # + DDP buckets


def test_offload_moves_the_optimizer_state_to_the_host():
    kw = dict(grad_checkpointing=True, loss_chunk_size=1024, micro_batch_size=4)
    for gpu_engine, offload, host_state in (("zero2", "zero2_offload", 16 * XL), ("zero3", "zero3_offload", 18 * XL),
                                            ("fsdp2", "fsdp2_offload", 16 * XL)):
        on_gpu, off = estimate_memory("gpt2-xl", engine=gpu_engine, **kw), estimate_memory("gpt2-xl", engine=offload, **kw)
        assert off.optimizer == 0 < on_gpu.optimizer and off.total < on_gpu.total - 10 * GiB
        assert off.activations == on_gpu.activations  # offload moves state, not activations
        assert off.host == host_state + plan.HOST_PROCESS_BYTES > on_gpu.host
    # without offload the host holds each process's start-up fp32 model (4N each) + the allowance
    assert estimate_memory("gpt2-xl", engine="zero2", n_processes=4).host == 4 * (4 * XL + plan.HOST_PROCESS_BYTES)
    # with it, the start-up copies are gone by the time the engine builds its state: the larger counts
    assert estimate_memory("gpt2", engine="zero2_offload", n_processes=8).host == 8 * (
        4 * count_params("gpt2") + plan.HOST_PROCESS_BYTES)


def test_deepspeed_runs_a_bf16_module_without_autocast():
    kw = dict(micro_batch_size=4, grad_checkpointing=True, loss_chunk_size=1024)
    ddp, zero, fsdp = (estimate_memory("gpt2-medium", engine=e, **kw) for e in ("ddp", "zero2", "fsdp2"))
    n = count_params("gpt2-medium")
    assert ddp.weights > 5 * n and zero.weights == 2 * n  # no fp32 weights, no autocast copies
    # a 2-byte residual stream: each checkpointed block input is 2 bytes per channel, not 4
    assert ddp.activations - zero.activations >= 4 * 1024 * 24 * 2 * 1024
    assert fsdp.activations == ddp.activations  # Accelerate autocasts FSDP2 too
    assert zero.logits < ddp.logits  # the chunked loss needs no 16-bit copy of a 16-bit weight


def test_engines_refuse_8bit_optimizers_and_unknown_names():
    with pytest.raises(UserError, match="adamw8bit runs on one device or under DDP, not zero2.*--optimizer adamw"):
        estimate_memory("gpt2", engine="zero2", optimizer="adamw8bit")
    with pytest.raises(UserError, match="engine='zero4'.*not one of.*Did you mean 'zero"):
        main(["--engine", "zero4"])
    with pytest.raises(UserError, match="adamw8bit runs on one device or under DDP, not fsdp2"):
        main(["--engine", "fsdp2", "--optimizer", "adamw8bit"])


def test_gpt2_xl_fits_a_4070_only_with_an_offload_engine(capsys):
    p = plan_run("gpt2-xl", gpu="rtx-4070", bench_dirs=[])
    assert p.engine == "ddp" and not any(c.fits for c in p.candidates)
    fits = {c.engine for c in p.alternatives if c.fits}
    assert fits and all(e.endswith("_offload") for e in fits)
    assert p.chosen.engine in fits and p.chosen.micro_batch_size >= 1 and p.block_size == 1024
    # with checkpointing and the chunked loss, ZeRO-3 offload fits a micro-batch well above 1 at T=1024
    z3 = plan_run("gpt2-xl", gpu="rtx-4070", engine="zero3_offload", grad_checkpointing=True, loss_chunk_size=1024,
                  bench_dirs=[])
    assert z3.chosen.fits and z3.chosen.max_micro_batch >= 8 and z3.alternatives == []
    assert main(["--model", "gpt2-xl", "--gpu", "rtx-4070"]) == 0
    out = capsys.readouterr().out
    assert "nothing fits under ddp" in out and f"under {p.chosen.engine}" in out
    assert "accelerate launch --config_file accelerate_configs/deepspeed_" in out


def test_host_memory_decides_between_offload_engines():
    p = plan_run("gpt2-xl", gpu="rtx-4070", bench_dirs=[], host_memory=26 * GiB)
    assert p.chosen is not None and p.chosen.memory.host <= 26 * GiB
    assert not next(c for c in p.alternatives if c.engine == "zero3_offload").fits  # needs 18N + allowance
    p = plan_run("gpt2-xl", gpu="rtx-4070", bench_dirs=[], host_memory=16 * GiB)
    assert p.chosen is None
    assert "of host RAM" in format_plan(p)


def test_offload_throughput_pays_for_pcie():
    kw = dict(gpu="rtx-4070", grad_checkpointing=True, loss_chunk_size=1024, micro_batch_size=4, bench_dirs=[])
    z2, z3 = (plan_run("gpt2-xl", engine=e, **kw).chosen for e in ("zero2_offload", "zero3_offload"))
    ideal = z2.mfu * GPUS["rtx-4070"].bf16_dense_flops / flops_per_token(count_params_for_flops("gpt2-xl"), 48, 1600, 1024)
    assert z3.tokens_per_s < z2.tokens_per_s < ideal  # zero3 also fetches the weights three times a micro-step


def test_the_xl_recipe_fits_its_card_under_its_engine():
    from gpt2fit.config import micro_batch, parse_config

    cfg, _ = parse_config(["finetune-gpt2-xl-12gb"])
    assert cfg.model.init_from == "gpt2-xl" and cfg.optim.optimizer == "adamw"
    micro = micro_batch(cfg)
    est = estimate_memory("gpt2-xl", engine="zero3_offload", micro_batch_size=micro,
                          **plan.memory_settings(cfg, "bf16"))
    assert est.fits(GPUS["rtx-4070"].memory_bytes) and est.host < 32 * GiB
    assert micro * cfg.model.block_size * 8 == parse_count(cfg.optim.tokens_per_step)  # its comment's arithmetic


def test_measured_mfu_from_benchmarks_json(tmp_path):
    rows = {"results": [
        {"model": "gpt2", "grad_checkpointing": False, "optimizer": "adamw", "mfu": 0.52,
         "device": "NVIDIA GeForce RTX 4090", "tokens_per_s": 1},
        {"model": "gpt2", "grad_checkpointing": False, "optimizer": "adamw", "mfu": 0.9,
         "device": "NVIDIA H100 80GB HBM3"},  # another GPU: ignored
    ]}
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    (tmp_path / "broken.json").write_text("{not json")
    p = plan_run("gpt2", gpu="rtx-4090", optimizer="adamw", grad_checkpointing=False, loss_chunk_size=0,
                 bench_dirs=[tmp_path])
    assert p.chosen.mfu == 0.52 and p.chosen.mfu_source.startswith("measured")
    p = plan_run("gpt2", gpu="rtx-4070", optimizer="adamw", grad_checkpointing=False, loss_chunk_size=0,
                 bench_dirs=[tmp_path])
    assert p.chosen.mfu != 0.52 and p.chosen.mfu_source == "assumed"
    # a config with the preset's shape (e.g. --init_from a local copy of "gpt2") uses the preset's rows
    same_shape = {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257, "_name_or_path": "/models/x"}
    p = plan_run(same_shape, gpu="rtx-4090", optimizer="adamw", grad_checkpointing=False, loss_chunk_size=0,
                 bench_dirs=[tmp_path])
    assert p.chosen.mfu == 0.52


# --- CLI -------------------------------------------------------------------------------------------


def test_main_json_parses(capsys):
    assert main(["--model", "gpt2-medium", "--gpu", "rtx-4070", "--max_tokens", "10B", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_params"] == 354_823_168
    assert out["chosen"]["micro_batch_size"] >= 1
    assert out["budget_tokens"] == 10 * 10**9
    assert out["gpu_key"] == "rtx-4070" and out["gpu"]["memory_bytes"] == GPUS["rtx-4070"].memory_bytes
    assert {"weights", "gradients", "optimizer", "activations", "logits", "workspace", "total"} <= set(
        out["candidates"][0]["memory"])


def test_main_table_and_custom_gpu(capsys):
    assert main(["--model", "gpt2", "--memory", "11.5G", "--peak_tflops", "50", "--grad_checkpointing", "off"]) == 0
    out = capsys.readouterr().out
    assert "custom" in out and "chosen:" in out and "tokens/s" in out
    assert "11.50 GiB" in out


def test_unknown_gpu_suggests_a_close_match():
    with pytest.raises(UserError, match=r"unknown GPU 'rtx-4070x'.*Did you mean 'rtx-4070'"):
        main(["--gpu", "rtx-4070x"])


def test_bad_flags_are_user_errors():
    with pytest.raises(UserError, match="twelve"):
        main(["--memory", "twelve"])
    with pytest.raises(UserError, match="mixed_precision='bf8'.*not one of"):
        main(["--mixed_precision", "bf8"])
    with pytest.raises(UserError, match="not both"):
        main(["--model", "gpt2", "--init_from", "gpt2"])
    with pytest.raises(UserError, match="margin=nan.*not a finite number"):
        main(["--margin", "nan"])
    with pytest.raises(UserError, match="peak_tflops=0.0 must be > 0"):
        main(["--peak_tflops", "0"])
    with pytest.raises(UserError, match="n_embd=30 must be divisible by n_head=4"):  # train's own checks
        main(["--n_layer", "1", "--n_head", "4", "--n_embd", "30"])


def _plan_json(capsys, *argv) -> dict:
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_options_fix_a_setting_and_earlier_spellings_keep_working(capsys):
    both = _plan_json(capsys, "--preset", "gpt2")
    assert len(both["candidates"]) == 8
    # the earlier "try both" spelling is the same as not giving the option
    assert _plan_json(capsys, "--model", "gpt2", "--optimizer", "auto", "--grad_checkpointing=auto",
                      "--loss_impl", "auto")["candidates"] == both["candidates"]
    one = _plan_json(capsys, "--preset", "gpt2", "--grad_checkpointing", "on", "--optimizer", "adamw8bit",
                     "--loss_chunk_size", "4096", "--micro_batch_size", "3", "--mixed_precision", "no")
    (c,) = one["candidates"]
    assert (c["grad_checkpointing"], c["optimizer"], c["loss_chunk_size"], c["micro_batch_size"]) == (
        True, "adamw8bit", 4096, 3)
    assert one["mixed_precision"] == "no" and c["memory"]["activations"] > 0
    for old, new in (("--precision", "--mixed_precision"), ("--loss_impl", "--loss_chunk_size"),
                     ("--activation", "gelu")):
        with pytest.raises(UserError, match=f"{old} is now .*{new}"):
            main([old, "chunked"])


def test_custom_model_padding_and_memory_cap(capsys):
    out = _plan_json(capsys, "--n_layer", "2", "--n_head", "2", "--n_embd", "64", "--block_size", "128",
                     "--pad_vocab_to", "64", "--gpu", "rtx-4090", "--max_memory", "12GiB")
    m = out["model"]
    assert (m["name"], m["n_positions"], m["vocab_size"]) == ("custom-L2-H2-C64", 128, 50304)  # as train builds it
    assert out["gpu"]["memory_bytes"] == 12 * GiB and any("max_memory" in n for n in out["notes"])
    assert out["n_params"] == count_params(plan.ModelShape("x", 2, 2, 64, n_positions=128, vocab_size=50304))


def test_init_from_local_dir_and_unknown_hub_id(tmp_path, monkeypatch, capsys):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 256, "vocab_size": 1000,
         "activation_function": "gelu_pytorch_tanh"}))
    assert main(["--init_from", str(tmp_path), "--gpu", "rtx-4070", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["block_size"] == 256 and out["model"]["activation"] == "gelu_pytorch_tanh"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="no-such-user/no-such-model"):
        main(["--init_from", "no-such-user/no-such-model"])


def _run_script(*args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(REPO / "scripts" / "plan.py"), *args],
                          capture_output=True, text=True, env=env, timeout=60)


def test_script_prints_a_table():
    r = _run_script("--model", "gpt2-medium", "--gpu", "rtx-4070")
    assert r.returncode == 0, r.stderr
    assert "max micro" in r.stdout and "chosen:" in r.stdout and "Chinchilla" in r.stdout


def test_script_unknown_gpu_exits_2_with_error_first():
    r = _run_script("--gpu", "rtx-9999")
    assert r.returncode == 2
    assert r.stderr.splitlines()[0].startswith("error: unknown GPU 'rtx-9999'")
    assert r.stdout == ""


def test_plan_module_does_not_import_torch():
    code = "import sys, gpt2fit.plan.planner; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_measured_mfu_comes_only_from_rows_at_the_planned_settings():
    base = {"model": "gpt2", "grad_checkpointing": False, "optimizer": "adamw", "device": "NVIDIA H100 80GB HBM3",
            "block_size": 1024, "precision": "bf16", "compile": False, "tf32": True, "_file": "b.json"}
    rows = [dict(base, mfu=0.41), dict(base, mfu=0.55, compile=True), dict(base, mfu=0.30, oom=True),
            dict(base, mfu=0.20, block_size=256), dict(base, mfu=0.25, sdpa_backend="math")]
    mfu, src = lookup_mfu(rows, model="gpt2", grad_checkpointing=False, optimizer="adamw", gpu_key="h100-80gb",
                          block_size=1024, mixed_precision="bf16")
    assert mfu == 0.41 and src.startswith("measured") and "1 row" in src
