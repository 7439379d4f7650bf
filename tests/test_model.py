import pytest
import torch

from gpt2fit.config import ModelArgs
from gpt2fit.train.model import build_config
from gpt2fit.train.optim import decay_param_names


@pytest.mark.parametrize("preset, expected", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168)])
def test_preset_parameter_counts(preset, expected):
    from transformers import GPT2LMHeadModel

    cfg = build_config(ModelArgs(preset=preset, block_size=1024), vocab_size=50257, eot_id=50256)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_vocab_padding():
    cfg = build_config(ModelArgs(preset="gpt2", pad_vocab_to=64), vocab_size=50257, eot_id=50256)
    assert cfg.vocab_size == 50304


def test_weight_decay_only_on_matrices():
    from transformers import GPT2LMHeadModel

    cfg = build_config(ModelArgs(n_layer=2, n_head=2, n_embd=32, block_size=16), vocab_size=100, eot_id=99)
    decay, no_decay = decay_param_names(GPT2LMHeadModel(cfg))
    assert all(n.endswith("weight") for n in decay)
    assert "transformer.wte.weight" in decay and "transformer.h.0.attn.c_attn.weight" in decay
    for name in ("transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.h.1.ln_1.weight",
                 "transformer.h.1.ln_2.bias", "transformer.h.0.attn.c_attn.bias", "transformer.wpe.weight"):
        assert name in no_decay
    assert not any("ln_" in n or n.endswith("bias") for n in decay)


def test_gradient_checkpointing_saves_activations_and_keeps_gradients():
    from gpt2fit.train.model import CausalLM, build_model

    margs = ModelArgs(n_layer=3, n_head=2, n_embd=32, block_size=16)
    x = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    grads, saved = {}, {}
    for ckpt in (False, True):
        margs.grad_checkpointing = ckpt
        model = CausalLM(build_model(margs, vocab_size=100, seed=0, eot_id=99)).train()
        lm = model.lm  # 5.23 renamed the flag; GPU hosts with 5.17 only have the old one
        assert (getattr(lm, "is_activation_checkpointing", None) if hasattr(type(lm), "is_activation_checkpointing")
                else lm.is_gradient_checkpointing) == ckpt
        n = [0]

        def pack(t):
            n[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        saved[ckpt] = n[0]
        grads[ckpt] = {k: p.grad.clone() for k, p in model.named_parameters()}
    assert saved[True] < saved[False] / 2
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], rtol=1e-5, atol=1e-7)


def test_bias_false_is_nanogpts_bias_free_model_in_a_standard_gpt2(tmp_path):
    """--bias false: biases are zero, frozen and outside the optimizer; a step leaves them zero, and
    the saved model is an ordinary GPT2LMHeadModel computing the bias-free function."""
    from transformers import GPT2LMHeadModel

    from gpt2fit.train.model import CausalLM, build_model
    from gpt2fit.train.optim import param_groups

    margs = ModelArgs(n_layer=2, n_head=2, n_embd=32, block_size=16, bias=False)
    lm = build_model(margs, vocab_size=100, seed=0, eot_id=99)
    biases = {n: p for n, p in lm.named_parameters() if n.endswith(".bias")}
    # ln_1, ln_2, c_attn, attn.c_proj, c_fc, mlp.c_proj per block, plus ln_f
    assert len(biases) == 2 * 6 + 1
    assert all(not p.requires_grad and not p.any() for p in biases.values())
    in_optimizer = {id(p) for g in param_groups(lm, 0.1) for p in g["params"]}
    assert not in_optimizer & {id(p) for p in biases.values()}
    with_bias = build_model(ModelArgs(n_layer=2, n_head=2, n_embd=32, block_size=16), vocab_size=100, seed=0, eot_id=99)
    assert sum(p.numel() for p in lm.parameters() if p.requires_grad) \
        == sum(p.numel() for p in with_bias.parameters()) - sum(p.numel() for p in biases.values())

    model = CausalLM(lm).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randint(0, 100, (2, 16))
    model(x, torch.roll(x, -1, 1)).backward()
    opt.step()
    assert all(not p.any() for p in biases.values())
    lm.save_pretrained(tmp_path / "m")
    back = GPT2LMHeadModel.from_pretrained(tmp_path / "m")
    assert torch.equal(back(x).logits, lm.eval()(x).logits)
