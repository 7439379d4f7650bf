"""Generate text from a run dir (its final/) or any Hugging Face GPT-2 model dir or Hub id.

    python scripts/sample.py runs/quickstart --prompt "def main(" --max_new_tokens 200 \
        --temperature 0.8 --top_k 200 --num_samples 3 --seed 1
"""

import sys

from gpt2fit.cli import main

if __name__ == "__main__":
    sys.exit(main(["sample", *sys.argv[1:]]))
