"""Train GPT-2 from scratch or finetune it, in an Accelerate loop.

    # one GPU (bf16), a built-in recipe, flags override the recipe:
    accelerate launch --config_file accelerate_configs/single_gpu.yaml scripts/train.py \
        gpt2-124m-openwebtext-12gb --data_dir data/owt --max_tokens 10B
    # several GPUs on one machine (DDP):
    accelerate launch --config_file accelerate_configs/multi_gpu.yaml scripts/train.py RECIPE ...
    # CPU, no launcher needed:
    python scripts/train.py quickstart

`python scripts/train.py --help` lists every flag; `gpt2fit recipes` lists the recipes.
Exit codes: 0 done, 2 bad input (message on stderr), 75 stopped by SIGTERM/SIGINT after saving a
checkpoint (rerun the same command with --resume auto).
"""

import sys

from gpt2fit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
