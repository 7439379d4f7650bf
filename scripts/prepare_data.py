"""Tokenize text into the token files training reads (train.bin, val.bin, meta.json, tokenizer/).

    # Python's standard library, with a 8192-token byte-level BPE trained on it:
    python scripts/prepare_data.py --input stdlib --tokenizer bpe --vocab_size 8192 --out_dir data/stdlib
    # your documents with the GPT-2 tokenizer (for finetuning gpt2 / gpt2-medium):
    python scripts/prepare_data.py --input docs/ notes/*.jsonl --tokenizer gpt2-medium --out_dir data/mydocs
    # Tiny Shakespeare, character level, nanoGPT's 90/10 split:
    python scripts/prepare_data.py --input data/tinyshakespeare.txt --tokenizer char --split chars \
        --val_fraction 0.1 --out_dir data/shakespeare_char
"""

import sys

from gpt2fit.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
