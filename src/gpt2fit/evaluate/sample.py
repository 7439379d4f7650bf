"""`gpt2fit sample`: generate text from a run dir (its final/) or any Hugging Face causal-LM dir or Hub id."""

from dataclasses import dataclass

import torch

from gpt2fit import options
from gpt2fit.errors import UserError
from gpt2fit.evaluate.model import load_model_and_tokenizer, resolve_device
from gpt2fit.options import opt


@dataclass
class SampleOptions:
    """model and sampling"""

    model: str = opt(None, "A run dir (uses its final/), a Hugging Face model dir, or a Hub id.", positional=True)
    prompt: str = opt("", "Text to continue ('' starts a new document).")
    max_new_tokens: int = opt(200, "Tokens to generate per sample.", minimum=1)
    temperature: float = opt(0.8, "Sampling temperature; 0 = greedy (always the most likely token).", minimum=0)
    top_k: int = opt(200, "Sample among the k most likely tokens (0 = off).", minimum=0)
    top_p: float | None = opt(None, "Nucleus sampling: the smallest set of tokens holding this much probability "
                                    "(0 < p <= 1; off if unset).", minimum=0, exclusive=True, maximum=1)
    seed: int = opt(1337, "Random seed (same seed, same text).")
    num_samples: int = opt(1, "How many samples to generate.", minimum=1)
    device: str | None = opt(None, "cpu, cuda, cuda:1, mps (default: cuda > mps > cpu).")


@torch.no_grad()
def generate(path_or_id: str, prompt: str = "", *, max_new_tokens: int = 200, temperature: float = 0.8,
             top_k: int | None = 200, top_p: float | None = None, seed: int = 1337, num_samples: int = 1,
             device: str | None = None) -> list[str]:
    """``num_samples`` continuations of ``prompt`` (included in each); the callers range-check the values."""
    model, tok = load_model_and_tokenizer(path_or_id, device)
    if tok is None:
        raise UserError(f"{path_or_id} has no tokenizer files; sampling needs one saved next to the model.")
    eot = tok.eos_token_id
    # an empty prompt starts a new document, as in training
    ids = (tok(prompt, add_special_tokens=False).input_ids if prompt else []) or [eot]
    room = model.config.n_positions - len(ids)
    if room <= 0:
        raise UserError(f"the prompt is {len(ids)} tokens, the model's context is {model.config.n_positions}; "
                        "shorten it.")
    input_ids = torch.tensor([ids] * num_samples, device=model.device)
    torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=sampling,
                         max_new_tokens=min(max_new_tokens, room), temperature=temperature if sampling else None,
                         top_k=(top_k or None) if sampling else None, top_p=top_p if sampling else None,
                         pad_token_id=eot, eos_token_id=eot)
    start = 1 if ids == [eot] else 0
    return [tok.decode(seq[start:], skip_special_tokens=True) for seq in out]


def main(argv=None) -> int:
    (o,), _ = options.parse(argv, [SampleOptions], prog="gpt2fit sample", description="Generate text from a model.",
                            epilog="Example: gpt2fit sample runs/quickstart --prompt 'def main(' --max_new_tokens 200")
    texts = generate(o.model, o.prompt, max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_k=o.top_k,
                     top_p=o.top_p, seed=o.seed, num_samples=o.num_samples, device=resolve_device(o.device))
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0

