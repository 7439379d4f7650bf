"""Time gpt2fit's real training step over a grid of settings: tokens/s, step time, MFU, peak memory.

    python scripts/bench.py --preset gpt2 --block_size 1024 --micro_batch_size 16 \
        --grid grad_checkpointing=false,true optimizer=adamw,adamw8bit loss_chunk_size=0,4096 \
        --baseline trainer --out benchmarks/gpt2_h100.json
    python scripts/bench.py --preset gpt2-medium --max_memory 12GiB \
        --grid grad_checkpointing=false,true optimizer=adamw,adamw8bit micro_batch_size=4,8,16 \
        --warmup 3 --steps 5 --out benchmarks/gpt2-medium_12gib.json
    python scripts/bench.py --preset gpt2 --data_dir data/owt --grid num_workers=0,2   # real DataLoader

Each cell builds a TrainConfig from the same flags `gpt2fit train` takes, runs train.setup and
times --warmup + --steps calls of train.train_step (CUDA events mark the step boundaries; one device sync after the last step). Writes the
JSON (device, versions, settings, raw per-step times) and a Markdown table next to it; rows in
benchmarks/*.json feed `gpt2fit plan` its measured MFU. A cell that runs out of memory is
recorded as {"oom": true} and the grid goes on. Same as `gpt2fit bench ...`; `--help` lists
every flag. benchmarks/gpu/run_all.sh is the full GPU suite.
"""

import sys

from gpt2fit.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
