"""Generate text from a run dir (its final/) or any Hugging Face causal-LM dir or Hub id."""

from __future__ import annotations

import argparse
import sys

import torch

from gpt2fit.errors import ArgumentParser, UserError
from gpt2fit.formats import resolve_model_path


def load(path_or_id: str, device: str | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model_path(path_or_id)
    try:
        tok = AutoTokenizer.from_pretrained(src)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a model from {path_or_id!r}: {str(e).strip().splitlines()[0]} "
                        "Give a run dir with final/, a model dir, or a Hub id.") from None
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval(), tok


@torch.no_grad()
def generate(path_or_id: str, prompt: str = "", *, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 200, top_p: float | None = None, seed: int = 1337, num_samples: int = 1,
             device: str | None = None, model_and_tokenizer=None) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (the prompt included in each returned text)."""
    if temperature < 0 or max_new_tokens <= 0 or num_samples <= 0:
        raise UserError(f"temperature={temperature} must be >= 0, max_new_tokens={max_new_tokens} and "
                        f"num_samples={num_samples} must be positive.")
    model, tok = model_and_tokenizer or load(path_or_id, device)
    eot = tok.eos_token_id
    ids = tok(prompt, add_special_tokens=False).input_ids if prompt else []
    if not ids:  # an empty prompt starts a new document, as in training
        ids = [eot]
    room = model.config.n_positions - len(ids)
    if room <= 0:
        raise UserError(f"the prompt is {len(ids)} tokens, the model's context is {model.config.n_positions}; "
                        "shorten it.")
    input_ids = torch.tensor([ids] * num_samples, device=model.device)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        max_new_tokens=min(max_new_tokens, room), do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None, top_k=top_k if temperature > 0 else None,
        top_p=top_p if temperature > 0 else None, pad_token_id=eot, eos_token_id=eot,
    )
    start = 1 if ids == [eot] else 0
    return [tok.decode(seq[start:], skip_special_tokens=True) for seq in out]


def main(argv=None) -> int:
    p = ArgumentParser(
        prog="gpt2fit sample", description="Generate text from a trained model.",
        epilog="Example: gpt2fit sample runs/quickstart --prompt 'def main(' --max_new_tokens 200",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="A run dir (uses its final/), a Hugging Face model dir, or a Hub id.")
    p.add_argument("--prompt", default="", help="Text to continue ('' starts a new document).")
    p.add_argument("--max_new_tokens", type=int, default=200, help="Tokens to generate per sample.")
    p.add_argument("--temperature", type=float, default=0.8, help="Sampling temperature; 0 = greedy.")
    p.add_argument("--top_k", type=int, default=200, help="Sample among the k most likely tokens (0 = off).")
    p.add_argument("--top_p", type=float, default=None, help="Nucleus sampling probability mass (off if unset).")
    p.add_argument("--seed", type=int, default=1337, help="Random seed (same seed, same text).")
    p.add_argument("--num_samples", type=int, default=1, help="How many samples to generate.")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available).")
    a = p.parse_args(argv)
    texts = generate(a.model, a.prompt, max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                     top_k=a.top_k or None, top_p=a.top_p, seed=a.seed, num_samples=a.num_samples,
                     device=a.device)
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0


if __name__ == "__main__":
    from gpt2fit.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))
