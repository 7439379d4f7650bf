"""Loading a model to evaluate or sample from (and saving its tokenizer so every transformers loads it), and what
every scorer shares: eval mode restored afterwards, sharding over Accelerate processes, summing counts over them."""

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM, AutoTokenizer

from gpt2fit.errors import UserError, first_line
from gpt2fit.formats import FINAL, is_run_dir, resolve_model_path

DTYPES = ("float32", "bfloat16", "float16", "auto")


def resolve_device(name: str | None = None) -> torch.device:
    """``name`` (cpu, cuda, cuda:1, mps) checked against this machine; None: cuda > mps > cpu."""
    have = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name is None:
        return torch.device("cuda" if have["cuda"] else "mps" if have["mps"] else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:1 or mps.") from None
    if not have.get(dev.type, False) or (dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count()):
        usable = [k for k, ok in have.items() if ok]
        raise UserError(f"--device {name}: no such device on this machine; use one of {', '.join(usable)}.")
    return dev


def check_model_path(path_or_id) -> str:
    """The model dir to load (``resolve_model_path``; else a Hub id), or a UserError for a local path without one."""
    path_or_id = os.fspath(path_or_id)
    p = Path(path_or_id)
    if is_run_dir(p) and not (p / FINAL / "config.json").is_file():
        raise UserError(f"run dir {p} has no {FINAL}/ model yet: wait for training to finish (it exports "
                        f"{p / FINAL}), or pass a Hugging Face model dir")
    model_path = resolve_model_path(path_or_id)
    looks_local = p.is_absolute() or path_or_id.startswith(".") or p.exists() or path_or_id.count("/") > 1
    if looks_local and not (Path(model_path) / "config.json").is_file():
        raise UserError(f"model {path_or_id} not found: pass a run dir (with {FINAL}/), a Hugging Face model "
                        "dir with config.json, or a Hub id such as openai-community/gpt2")
    return model_path


LOAD_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def load_error(name, model_path, e: Exception) -> UserError:
    """One line for a model that does not load: which file, what is wrong, what to do."""
    first = first_line(e)
    weights = sorted(Path(model_path).glob("*.safetensors")) if Path(model_path).is_dir() else []
    if isinstance(e, SafetensorError):  # truncated or overwritten: safetensors cannot read its header
        return UserError(f"{weights[0] if len(weights) == 1 else model_path} is damaged ({first}); copy or "
                         "export the model again (a run's final/ is rewritten by training to the end).")
    if isinstance(e, RuntimeError) and "mismatch" in first.lower() + str(e).lower():
        return UserError(f"{Path(model_path) / 'config.json'} does not match the weights in {model_path} (tensor "
                         "shapes differ); restore the config.json saved with these weights.")
    return UserError(f"cannot load model {name}: {first}. Pass a run dir (with {FINAL}/), a model dir with "
                     "config.json, or a Hub id (offline? unset HF_HUB_OFFLINE or download it first).")


def load_model_and_tokenizer(path_or_id, device=None, dtype=None):
    """``(model in eval mode, tokenizer or None)`` from a run dir (its ``final/``), a model dir or a Hub id; ``dtype``
    None = float32, "auto" = the checkpoint's own; ``device`` None = cuda > mps > cpu. No remote code."""
    model_path = check_model_path(path_or_id)
    if dtype is None or (isinstance(dtype, str) and dtype != "auto"):
        dtype = getattr(torch, dtype or "float32")
    device = device if isinstance(device, torch.device) else resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype, use_safetensors=True)
    except LOAD_ERRORS as e:
        raise load_error(path_or_id, model_path, e) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, TypeError, KeyError):  # no tokenizer files: fine for perplexity
        tokenizer = None
    return model.to(device).eval(), tokenizer


def save_tokenizer(tokenizer, dst, n_positions: int) -> None:
    """Save ``tokenizer`` into ``dst`` so transformers 4.x and 5.x both load it as it is: PreTrainedTokenizerFast (4.x
    lacks 5.x's TokenizersBackend; GPT2TokenizerFast makes 5.x rebuild a BPE, breaking the char tokenizer) and
    model_max_length = n_positions, so ``truncation=True`` gives inputs the model can take."""
    tokenizer.save_pretrained(dst)
    path = Path(dst) / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_max_length=int(n_positions))
    for key in ("is_local", "local_files_only"):  # how 5.x loaded it here, not a property of the tokenizer
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2))


def n_positions(model) -> int:
    cfg = model.config
    n = getattr(cfg, "n_positions", None) or getattr(cfg, "max_position_embeddings", None)
    if not n:
        raise UserError("the model config has no n_positions / max_position_embeddings; pass --block_size")
    return int(n)


@contextmanager
def eval_mode(module):
    """Every submodule in eval mode (no dropout) inside, each one's own flag restored after."""
    mods = list(module.modules()) if isinstance(module, torch.nn.Module) else []
    flags = [m.training for m in mods]
    if mods:
        module.eval()
    try:
        yield
    finally:
        for m, flag in zip(mods, flags):
            m.training = flag


def shards(items: list, accelerator, batch_size: int) -> tuple[list, int]:
    """This process's share of ``items`` (every world-th one) and the batches the busiest process runs: all must
    run as many forwards (sharded and DDP models synchronize in each); the others add dummy batches."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    mine = items[rank::world]
    return mine, max(-(-len(items[r::world]) // batch_size) for r in range(world))


def sum_over_processes(t: torch.Tensor, accelerator) -> list[float]:
    """Sum a float64 tensor of counts over all processes (float64 keeps token counts exact)."""
    if accelerator is not None and accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()
