"""A gpt2fit model loads in the transformers the ecosystem pins: a real run, pushed (final/ and a
checkpoint on branch step<N>) to the local Hub server, loaded by revision with transformers 4.57 and
with this venv's 5.x, each in a fresh process that only has transformers (no gpt2fit).

Needs an interpreter with transformers 4.57 in GPT2FIT_TF457_PYTHON; `.ci/run` builds one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from conftest import tiny_flags
from gpt2fit.train.command import main as train_main
from hub_server import FakeHub

TF457 = os.environ.get("GPT2FIT_TF457_PYTHON")
LOAD = r"""
import sys, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
repo, rev = sys.argv[1], sys.argv[2]
tok = AutoTokenizer.from_pretrained(repo, revision=rev)
model = AutoModelForCausalLM.from_pretrained(repo, revision=rev)
ids = tok("the " * 200, truncation=True, return_tensors="pt").input_ids
assert ids.shape[1] == model.config.n_positions == tok.model_max_length, (ids.shape, tok.model_max_length)
out = model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
print(transformers.__version__, type(tok).__name__, tuple(out.shape))
"""


@pytest.mark.skipif(not TF457, reason="GPT2FIT_TF457_PYTHON (a python with transformers 4.57) is not set")
def test_pushed_run_loads_by_revision_in_transformers_457_and_5(char_data, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from gpt2fit.publish.push import push_run

    run = tmp_path / "run"
    assert train_main(tiny_flags(char_data, run, max_steps=4, checkpoint_interval=2, keep_checkpoints=2)) == 0
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 30)
    with FakeHub() as hub:
        push_run(run, "user/tiny", endpoint=hub.url, include_checkpoints=True, license="mit")
        for python in (TF457, sys.executable):
            for rev in ("main", "step4"):
                env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=tempfile.mkdtemp())
                p = subprocess.run([python, "-c", LOAD, "user/tiny", rev], env=env, capture_output=True, text=True,
                                   timeout=300)
                assert p.returncode == 0, (python, rev, p.stderr[-2000:])
                version = p.stdout.split()[0]
                assert version.startswith("4.57" if python == TF457 else "5."), p.stdout
