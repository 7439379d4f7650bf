"""Plot train/val loss curves (and HellaSwag, when logged) of one or more runs.

Usage:
    python scripts/plot.py out/my-run                     # -> out/my-run/loss.png (+ loss.json)
    python scripts/plot.py out/a out/b --labels adamw,adamw8bit --ref "3.28=GPT-2 124M" \
        --x tokens --out loss_comparison.png

Same as `gpt2fit plot ...`; `--help` lists every flag.
"""

import sys

from gpt2fit.cli import main

if __name__ == "__main__":
    sys.exit(main(["plot", *sys.argv[1:]]))
