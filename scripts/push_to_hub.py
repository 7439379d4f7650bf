"""Push a finished run to the Hugging Face Hub: model, model card, loss curve, eval results.

    python scripts/push_to_hub.py runs/quickstart --repo_id your-username/gpt2-quickstart \
        [--private] [--revision BRANCH] [--include_checkpoints] [--license mit] [--endpoint URL] \
        [--dry_run]

Same as `gpt2fit push ...`. Log in first with `hf auth login` or export HF_TOKEN (a token with
write access); the token is never written to the run dir or the card. `--dry_run` prints the
model card and the file list without touching the network.
"""

import sys

from gpt2fit.cli import main

if __name__ == "__main__":
    sys.exit(main(["push", *sys.argv[1:]]))
