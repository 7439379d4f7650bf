"""Will it fit? Plan GPU memory, micro-batch, accumulation and time before training.

    python scripts/plan.py --model gpt2-medium --gpu rtx-4070
    python scripts/plan.py --model gpt2 --gpu rtx-4090 --max_tokens 10B --json
    python scripts/plan.py --init_from runs/my-run --memory 11.5GiB --peak_tflops 58.3

Prints one row per candidate setting (gradient checkpointing x optimizer x loss) with memory by
component, whether it fits and the largest micro-batch that does, then the chosen setting, the
gradient accumulation for ~0.5M tokens per step, tokens/s, time to the budget and training FLOPs.
Same as `gpt2fit plan ...`; `--help` lists every flag.
"""

import sys

from gpt2fit.cli import main

if __name__ == "__main__":
    sys.exit(main(["plan", *sys.argv[1:]]))
