"""Training configuration: argument dataclasses, recipes, command-line overrides.

Resolution order (later wins): dataclass defaults -> recipe YAML -> command-line flags.
A recipe is a built-in name (``gpt2fit recipes`` lists them; files in ``gpt2fit/recipes/``) or a
path to a YAML file holding a flat mapping with the same keys as the flags. Every field's help
text below is what ``--help`` prints.
"""

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gpt2fit import options, units
from gpt2fit.errors import UserError, suggest
from gpt2fit.options import fields_of, opt

RECIPE_DIR = Path(__file__).parent / "recipes"
PRESETS = {  # the released GPT-2 sizes (Radford et al. 2019); vocab 50257, 1024 positions
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}
GPT2_VOCAB, GPT2_POSITIONS = 50257, 1024


f = opt  # short: every field below is f(default, help, **checks)


@dataclass
class ModelArgs:
    preset: str | None = f(None, "GPT-2 size to build from scratch: gpt2 (124M), gpt2-medium (350M), gpt2-large "
                                 "(774M), gpt2-xl (1.5B). Ignored with init_from.", choices=tuple(PRESETS))
    init_from: str | None = f(None, "Finetune instead: a Hub id (gpt2-medium) or a local model dir "
                                    "(or a gpt2fit run dir) to load weights from.")
    n_layer: int | None = f(None, "Transformer blocks, for a custom small model (overrides the preset).", minimum=1)
    n_head: int | None = f(None, "Attention heads, for a custom small model.", minimum=1)
    n_embd: int | None = f(None, "Hidden width, for a custom small model.", minimum=1)
    block_size: int = f(1024, "Context length in tokens per training sequence (<= the model's n_positions).", minimum=1)
    dropout: float = f(0.0, "Dropout on embeddings, attention and residuals (0 for pretraining; 0.1-0.2 "
                            "for small data).", minimum=0)
    pad_vocab_to: int = f(1, "Pad the embedding rows to a multiple of this (64 speeds up GPU matmuls); "
                             "extra rows are never predicted by the data.", minimum=1)
    attn_implementation: str = f("sdpa", "Attention kernel: sdpa (PyTorch flash/efficient), flash_attention_2 "
                                         "(needs flash-attn), eager.", choices=("sdpa", "flash_attention_2", "eager"))
    activation_function: str = f("gelu_pytorch_tanh", "MLP activation for a model built from scratch: "
                                 "gelu_pytorch_tanh (GPT-2's tanh GELU, one fused op) or gelu (exact erf GELU, as "
                                 "nanoGPT's nn.GELU). Finetuning keeps the loaded model's.",
                                 choices=("gelu_pytorch_tanh", "gelu"))
    bias: bool = f(True, "false: every bias (linear and LayerNorm) of a model built from scratch is fixed at "
                         "zero and not trained, as nanoGPT's bias=False; the saved model is a standard GPT-2 "
                         "whose biases are zero.")
    grad_checkpointing: bool = f(False, "Recompute activations in backward: ~1/3 more compute, far less memory.")
    compile: bool = f(False, "torch.compile the model (faster on GPU after a minute of compiling).")
    compile_scope: str = f("model", "With compile: model = the whole model and its loss as one graph; blocks = "
                                    "Accelerate's regional compilation (each transformer block compiled once and "
                                    "reused, the rest separately; much shorter cold start).",
                           choices=("model", "blocks"))
    compile_mode: str = f("default", "torch.compile mode: default, reduce-overhead (CUDA graphs: fewer kernel "
                                     "launches, more memory), max-autotune, max-autotune-no-cudagraphs.",
                          choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"))
    loss_chunk_size: int = f(0, "Compute the loss over this many tokens at a time so the full fp32 logits "
                                "(206 MB per 1024 tokens for GPT-2) never exist; 0 = plain loss.", minimum=0)


@dataclass
class DataArgs:
    data_dir: str | None = f(None, "Prepared data dir with train.bin, val.bin and meta.json "
                                   "(from `gpt2fit prepare`).")
    prepare_from: str | None = f(None, "If data_dir holds no prepared data yet, prepare it first from this input "
                                       "(files, a dir, a glob, or 'stdlib'), with the options below.")
    tokenizer: str = f("gpt2", "For prepare_from: a Hub id or tokenizer dir, 'bpe' (train one) or 'char'.")
    vocab_size: int = f(8192, "For prepare_from with tokenizer 'bpe': the vocabulary size to train.")
    val_split: str = f("documents", "For prepare_from: documents (a seeded fraction of documents) or chars (the "
                                    "last val_fraction of the text, as nanoGPT).", choices=("documents", "chars"))
    val_fraction: float = f(0.05, "For prepare_from: fraction of the data held out for validation.")
    sampling: str = f("shuffle", "How training windows are drawn: shuffle = every block of the data once "
                                 "per epoch, seeded order and offset; random = independent random offsets "
                                 "(nanoGPT).", choices=("shuffle", "random"))
    num_workers: int = f(0, "DataLoader worker processes (0 = load in the training process).", minimum=0)
    pin_memory: bool = f(True, "On CUDA, put batches in pinned host memory so the copy to the GPU runs "
                               "asynchronously (non_blocking).")


@dataclass
class OptimArgs:
    optimizer: str = f("adamw", "adamw (torch, fused on CUDA), adamw8bit or paged_adamw8bit (bitsandbytes; ~75% "
                                "less optimizer memory), or muon (torch.optim.Muon on the blocks' 2-D weights, AdamW "
                                "on embeddings, LayerNorms and biases; one state buffer instead of two).",
                       choices=("adamw", "adamw8bit", "paged_adamw8bit", "muon"))
    learning_rate: float = f(6.0e-4, "Peak learning rate (AdamW's; with muon, of the non-matrix parameters).",
                             minimum=0)
    muon_learning_rate: float | None = f(None, "muon only: peak LR of the block matrices, scaled per matrix by "
                                               "0.2*sqrt(max(rows, cols)) so AdamW-scale rates fit (Moonlight); "
                                               "default: learning_rate.", minimum=0)
    muon_weight_decay: float | None = f(None, "muon only: decoupled weight decay of the block matrices "
                                              "(default: weight_decay).", minimum=0)
    muon_momentum: float | None = f(None, "muon only: Nesterov momentum (default 0.95).", minimum=0,
                                    maximum=0.999)
    min_lr: float = f(6.0e-5, "Learning rate at the end of the decay.", minimum=0)
    lr_schedule: str = f("cosine", "cosine = warmup then cosine to min_lr; wsd = warmup-stable-decay; "
                                   "constant = warmup then flat.", choices=("cosine", "wsd", "constant"))
    warmup_steps: int = f(100, "Optimizer steps of linear warmup.", minimum=0)
    lr_decay_steps: int | None = f(None, "Steps over which the LR decays to min_lr (default: the run length).",
                                   minimum=1)
    wsd_decay_fraction: float = f(0.2, "wsd only: fraction of the run spent in the final decay.", minimum=0,
                                  exclusive=True, maximum=1)
    weight_decay: float = f(0.1, "AdamW weight decay, applied to 2-D weight matrices only (not biases, "
                                 "LayerNorms).", minimum=0)
    beta1: float = f(0.9, "AdamW beta1.")
    beta2: float = f(0.95, "AdamW beta2.")
    eps: float = f(1.0e-8, "AdamW epsilon.")
    grad_clip: float = f(1.0, "Clip the global gradient norm to this (0 = off).", minimum=0)
    micro_batch_size: str = f("8", "Sequences per forward/backward on each process, or 'auto' for the largest "
                                   "that fits.")
    grad_accum_steps: int = f(1, "Micro-batches accumulated per optimizer step (ignored when tokens_per_step "
                                 "is set).", minimum=1)
    tokens_per_step: str | None = f(None, "Target tokens per optimizer step (e.g. 0.5M); sets grad_accum_steps "
                                          "= ceil(target / (micro_batch * block * processes)).")


@dataclass
class RunArgs:
    out_dir: str = f("runs/default", "Run dir: config.yaml, metrics.jsonl, checkpoints/, final/.")
    max_steps: int | None = f(None, "Stop after this many optimizer steps.", minimum=1)
    max_tokens: str | None = f(None, "Stop after this many training tokens (10B, 300M, 2.5e9 accepted).")
    epochs: float | None = f(None, "Stop after this many passes over train.bin (for small finetuning data).",
                             minimum=0, exclusive=True)
    eval_interval: int = f(250, "Run validation every N optimizer steps (and at the end).", minimum=1)
    eval_batches: int = f(20, "Validation micro-batches per evaluation (the same fixed windows every time); "
                              "0 = the whole val split.", minimum=0)
    eval_before_training: bool = f(False, "Validate once before the first step (shows the starting loss).")
    hellaswag: str | None = f(None, "Score HellaSwag during training (like llm.c): hellaswag_val.jsonl or a "
                                    "Hub dataset id (Rowan/hellaswag).")
    hellaswag_interval: int = f(0, "Score HellaSwag every N optimizer steps and at the end (0 = at eval_interval).",
                                minimum=0)
    hellaswag_examples: int = f(500, "Examples in the fixed, seeded HellaSwag subset (0 = all 10,042).", minimum=0)
    log_interval: int = f(10, "Log loss/LR/throughput every N optimizer steps (the only host syncs).", minimum=1)
    checkpoint_interval: int = f(0, "Save a resumable checkpoint every N optimizer steps (0 = only at the end).",
                                 minimum=0)
    keep_checkpoints: int = f(2, "Keep the newest K checkpoints; older ones are deleted.", minimum=1)
    resume: str | None = f(None, "'auto' = continue from the newest complete checkpoint in out_dir; or a "
                                 "checkpoint path.")
    overwrite: bool = f(False, "Delete an earlier run in out_dir and start fresh.")
    seed: int = f(1337, "Seed for weights, data order and dropout.", minimum=0, maximum=2**32 - 1)
    mixed_precision: str = f("auto", "bf16, fp16, no, or auto (bf16 on GPUs that support it, else no).",
                             choices=("auto", "bf16", "fp16", "no"))
    tf32: bool = f(True, "Allow TF32 matmuls on CUDA (Ampere and newer).")
    report_to: str = f("auto", "Trackers, comma-separated: tensorboard, wandb, trackio, all, none; auto = "
                               "tensorboard when it is installed (logs under out_dir).")
    max_nonfinite_steps: int = f(5, "Stop the run after this many non-finite (NaN/inf) steps in a row; each one "
                                    "is skipped, not applied.", minimum=1)
    host_sync: str = f("step", "When the host learns whether a step was finite: step = after every optimizer step "
                               "(one GPU sync a step; any optimizer); log = only at log/eval/checkpoint steps, with "
                               "non-finite updates skipped on the GPU by fused AdamW (optimizer adamw, not fp16); the "
                               "K-in-a-row stop then acts at the next check.", choices=("step", "log"))
    spike_factor: float = f(2.0, "Log a loss spike when the loss exceeds this multiple of its running mean.",
                            minimum=0, exclusive=True)
    max_memory: str | None = f(None, "Cap the CUDA memory this process may use (e.g. 12GiB) to behave like a "
                                     "smaller card.")
    sample_prompt: str | None = f(None, "Print a sample from this prompt when training ends.")
    sample_tokens: int = f(200, "Tokens to generate for the end-of-training sample.", minimum=1)
    push_to_hub: bool = f(False, "Upload final/ to the Hugging Face Hub at the end (in the background).")
    hub_model_id: str | None = f(None, "Hub repo id for --push_to_hub, e.g. you/gpt2-medium-mydocs.")
    hub_private: bool = f(False, "Create the Hub repo as private.")
    hub_revision: str | None = f(None, "Branch to push to (created if missing).")
    hub_push_checkpoints: bool = f(False, "Also push each checkpoint, while training, as a complete model on "
                                          "branch step<N> (from_pretrained(repo, revision='step1000')).")


SECTIONS = (ModelArgs, DataArgs, OptimArgs, RunArgs)


@dataclass
class TrainConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    optim: OptimArgs = field(default_factory=OptimArgs)
    run: RunArgs = field(default_factory=RunArgs)
    recipe: str | None = None

    # -- flat views -------------------------------------------------------------------------
    def to_flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {"recipe": self.recipe}
        for sec in (self.model, self.data, self.optim, self.run):
            out.update(dataclasses.asdict(sec))
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_flat(), sort_keys=False)


FIELDS = fields_of(SECTIONS)
NON_FLAG_KEYS = {"description", "recipe"}  # allowed in recipe files (a run's config.yaml has recipe:)


# -- recipes ----------------------------------------------------------------------------------
def builtin_recipes() -> dict[str, Path]:
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def load_recipe(name_or_path: str) -> dict[str, Any]:
    """Read a recipe (built-in name or YAML path) into a validated flat dict."""
    recipes = builtin_recipes()
    path = Path(name_or_path)
    if name_or_path in recipes:
        path = recipes[name_or_path]
    elif not (path.suffix in (".yaml", ".yml") and path.is_file()):
        if path.suffix in (".yaml", ".yml"):
            raise UserError(f"recipe file {name_or_path!r} does not exist.")
        raise UserError(f"unknown recipe {name_or_path!r}.{suggest(name_or_path, recipes)} "
                        f"Built-in recipes: {', '.join(recipes)}; or pass a path to a .yaml file.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"recipe {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {str(path)!r} must be a mapping of flag: value, got {type(raw).__name__}.")
    out = {}
    for key, value in raw.items():
        if key in NON_FLAG_KEYS:
            continue
        if key not in FIELDS:
            raise UserError(f"unknown key {key!r} in recipe {str(path)!r}.{suggest(key, FIELDS)}")
        out[key] = options.coerce(key, value, f"recipe {path.name}", FIELDS)
    return out


def recipe_description(path: Path) -> str:
    try:
        return str((yaml.safe_load(path.read_text()) or {}).get("description", "")).strip()
    except yaml.YAMLError:
        return "(invalid YAML)"


# -- command line -----------------------------------------------------------------------------
DESCRIPTION = "Train GPT-2 from scratch or finetune it. Settings come from a recipe, then flags."
EPILOG = ("Example: accelerate launch --config_file accelerate_configs/single_gpu.yaml "
          "scripts/train.py gpt2-124m-openwebtext-12gb --data_dir data/owt --max_tokens 10B")


@dataclass
class CommandArgs:
    """recipe (settings: defaults, then the recipe, then flags)"""

    recipe: str | None = f(None, "Built-in recipe name (see `gpt2fit recipes`), a recipe .yaml, or a run's "
                                 "config.yaml.", positional=True, nargs="?")
    config: str | None = f(None, "The recipe as a flag: a built-in name or a .yaml path (instead of the positional).",
                           metavar="FILE.yaml")
    print_config: bool = f(False, "Print the resolved config as YAML and exit without training.")


def parse_config(argv: list[str] | None = None, prog: str = "gpt2fit train") -> tuple[TrainConfig, bool]:
    """argv -> (resolved TrainConfig, print_only). Raises UserError on any bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # a misspelt flag's value would be read as the recipe: parse refuses unknown flags first
    (c, *sections), given = options.parse(argv, [CommandArgs, *SECTIONS], prog=prog, description=DESCRIPTION,
                                          epilog=EPILOG)
    if c.recipe is not None and c.config is not None and c.recipe != c.config:
        raise UserError(f"two recipes given ({c.recipe!r} and --config {c.config!r}); give one.")
    recipe = c.config or c.recipe
    flags = {k: v for s in sections for k, v in vars(s).items() if k in given}
    cfg = TrainConfig(*options.build(SECTIONS, {**(load_recipe(recipe) if recipe else {}), **flags}), recipe=recipe)
    validate(cfg)
    return cfg, c.print_config


def validate(cfg: TrainConfig) -> None:
    m, o, r = cfg.model, cfg.optim, cfg.run
    for name, value in cfg.to_flat().items():  # the ranges on the fields, for configs built in code too
        if name in FIELDS and value is not None:
            options.check(name, value, FIELDS[name][1], "the config")
    if o.learning_rate == 0:
        raise UserError("learning_rate=0 would never update the model; use e.g. 6.0e-4.")
    muon_set = [k for k in ("muon_learning_rate", "muon_weight_decay", "muon_momentum") if getattr(o, k) is not None]
    if o.optimizer != "muon" and muon_set:
        raise UserError(f"--{muon_set[0]} applies to --optimizer muon, not {o.optimizer!r} (which steps the block "
                        f"matrices itself); add --optimizer muon or drop --{muon_set[0]}.")
    if o.muon_learning_rate == 0:
        raise UserError("muon_learning_rate=0 would never update the block matrices; use e.g. 6.0e-4, or leave it "
                        "unset to use learning_rate.")
    if o.min_lr > o.learning_rate:
        raise UserError(f"min_lr={o.min_lr} is above learning_rate={o.learning_rate}; lower min_lr.")
    if not 0 <= m.dropout < 1:
        raise UserError(f"dropout={m.dropout} must be in [0, 1).")
    if not (0 < o.beta1 < 1 and 0 < o.beta2 < 1):
        raise UserError(f"beta1={o.beta1}, beta2={o.beta2} must each be in (0, 1).")
    micro_batch(cfg)  # validates the string
    if o.tokens_per_step is not None:
        parse_count(o.tokens_per_step, "tokens_per_step")
    if r.max_tokens is not None:
        parse_count(r.max_tokens, "max_tokens")
    if r.max_memory is not None:
        units.parse_size(r.max_memory)
    if r.host_sync == "log" and (o.optimizer != "adamw" or r.mixed_precision == "fp16"):
        what = f"optimizer={o.optimizer!r}" if o.optimizer != "adamw" else "mixed_precision='fp16' (its grad scaler)"
        raise UserError(f"host_sync=log skips non-finite updates inside fused torch AdamW, which {what} does "
                        "not use; use --host_sync step, or --optimizer adamw with bf16/no.")
    if not m.bias and m.init_from:
        raise UserError(f"bias=false applies to models built from scratch, not to init_from {m.init_from!r} "
                        "(its trained biases would be thrown away); drop --bias false.")
    if r.resume is not None and r.overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one.")
    if r.push_to_hub and not r.hub_model_id:
        raise UserError("--push_to_hub needs --hub_model_id (e.g. you/gpt2-medium-mydocs).")
    if m.n_embd is not None and m.n_head is not None and m.n_embd % m.n_head:
        raise UserError(f"n_embd={m.n_embd} must be divisible by n_head={m.n_head}.")
    for tracker in r.report_to.split(","):
        if tracker.strip() not in ("auto", "none", "all", "tensorboard", "wandb", "trackio", ""):
            raise UserError(f"report_to={tracker!r} is not one of auto, tensorboard, wandb, trackio, all, none.")


def micro_batch(cfg: TrainConfig) -> int | None:
    """The micro-batch size as an int, or None for 'auto'."""
    v = str(cfg.optim.micro_batch_size).strip().lower()
    if v == "auto":
        return None
    try:
        n = int(v)
    except ValueError:
        raise UserError(f"micro_batch_size={cfg.optim.micro_batch_size!r} must be a positive integer or "
                        f"'auto'.") from None
    if n <= 0:
        raise UserError(f"micro_batch_size={n} must be a positive integer or 'auto'.")
    return n


def parse_count(text: str | int | float, key: str = "value") -> int:
    """A positive count (10B, 0.5M, 491520) for option ``key``."""
    try:
        n = units.parse_count(text)
    except UserError as e:
        raise UserError(f"{key}: {e}") from None
    if n <= 0:
        raise UserError(f"{key}={text!r} must be positive.")
    return n


def grad_accum_for(cfg: TrainConfig, micro: int, world: int) -> int:
    if cfg.optim.tokens_per_step is None:
        return cfg.optim.grad_accum_steps
    target = parse_count(cfg.optim.tokens_per_step, "tokens_per_step")
    return max(1, math.ceil(target / (micro * cfg.model.block_size * world)))


# -- `gpt2fit recipes` ------------------------------------------------------------------------
@dataclass
class RecipesArgs:
    """recipes"""

    name: str | None = f(None, "Show this recipe's YAML instead of the list.", positional=True, nargs="?")


def main(argv=None) -> int:
    (a,), _ = options.parse(argv, [RecipesArgs], prog="gpt2fit recipes", description="List the built-in recipes.")
    recipes = builtin_recipes()
    if a.name:
        if a.name not in recipes:
            raise UserError(f"unknown recipe {a.name!r}.{suggest(a.name, recipes)}")
        print(recipes[a.name].read_text(), end="")
        return 0
    width = max(len(n) for n in recipes)
    for name, path in recipes.items():
        print(f"{name:<{width}}  {recipe_description(path)}")
    return 0
