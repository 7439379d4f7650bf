"""Validation perplexity and zero-shot HellaSwag of a run dir, model dir or Hub id.

Usage:
    python scripts/eval.py out/my-run --data_dir data/fineweb10B \
        --hellaswag hellaswag_val.jsonl          # writes out/my-run/eval_results.json
    python scripts/eval.py openai-community/gpt2 --hellaswag Rowan/hellaswag --output gpt2.json

Several processes (the windows and examples are sharded, the sums all-reduced):
    accelerate launch --multi_gpu --num_processes 2 scripts/eval.py out/my-run --data_dir data/x
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 \
        scripts/eval.py out/my-run --data_dir data/x        # two gloo ranks on CPU

Same as `gpt2fit eval ...`; `--help` lists every flag.
"""

import sys

from gpt2fit.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
