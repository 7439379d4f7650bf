"""The ``gpt2fit`` command: ``gpt2fit <subcommand> [args...]``.

Each subcommand is the ``main(argv)`` of one module, the same function its script in
``scripts/`` calls, so ``gpt2fit train quickstart`` and ``python scripts/train.py quickstart``
behave identically.
"""

import importlib
import os
import sys

from gpt2fit import __version__
from gpt2fit.errors import UserError, suggest

# name -> (module, one-line summary). Modules are imported lazily: `gpt2fit plan` must not pay
# for importing the training stack.
COMMANDS = {
    "prepare": ("gpt2fit.prepare.command", "tokenize text into train.bin / val.bin token files"),
    "train": ("gpt2fit.train.command", "train or finetune a GPT-2 (use `accelerate launch` for GPUs)"),
    "sample": ("gpt2fit.evaluate.sample", "generate text from a run dir or a Hugging Face model dir"),
    "plan": ("gpt2fit.plan.planner", "will it fit? memory, micro-batch and time before you start"),
    "eval": ("gpt2fit.evaluate.command", "perplexity and HellaSwag on a run dir or model dir"),
    "plot": ("gpt2fit.evaluate.plot", "plot train/val loss curves of one or more runs"),
    "push": ("gpt2fit.publish.push", "push a finished run to the Hugging Face Hub"),
    "bench": ("gpt2fit.train.bench", "measure tokens/s, MFU and peak memory of training steps"),
    "recipes": ("gpt2fit.config", "list the built-in recipes"),
}


def usage() -> str:
    commands = [f"  {name:<9} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(["usage: gpt2fit <command> [args...]", "", "commands:", *commands, "",
                      "`gpt2fit <command> --help` shows each command's flags."])


def run_main(main, argv) -> int:
    """Call a module's ``main(argv)``; turn UserError into a one-line-first message + exit 2."""
    # transformers' advisory warnings would otherwise stand before our own first line
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        rc = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(rc or 0)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"gpt2fit {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}.{suggest(name, COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    return run_main(importlib.import_module(COMMANDS[name][0]).main, rest)


if __name__ == "__main__":
    sys.exit(main())
