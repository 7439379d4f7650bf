"""Issue: finetune a pretrained GPT-2 on your documents and publish it. End to end on the CPU:
a tiny GPT-2 dir stands in for gpt2-medium; the Hub is a real HTTP server on 127.0.0.1."""

import json
from pathlib import Path

import pytest

from conftest import read_rows, run_cli
from hub_server import FakeHub

SECRET = "hf_finetuneSecretToken0123456789"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory) -> Path:
    """A tiny GPT-2 with its own byte-level BPE tokenizer, saved like a Hub model dir."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2fit.prepare.tokenizers import train_bpe

    d = tmp_path_factory.mktemp("base") / "tiny-gpt2"
    texts = [f"Document {i}: the quick brown fox jumps over the lazy dog {i % 7} times." for i in range(400)]
    tok = train_bpe(texts, vocab_size=400)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tok),
                               bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    for i in range(12):
        (d / f"note_{i}.md").write_text(f"# Note {i}\n" + "The lazy dog sleeps while the fox runs. " * (20 + i))
    return d


def flags(base, docs, data, out, *extra):
    return ["finetune-gpt2-medium-12gb", "--init_from", base, "--prepare_from", docs, "--tokenizer", base,
            "--data_dir", data, "--out_dir", out, "--val_fraction", "0.25", "--block_size", "32",
            "--micro_batch_size", "4", "--tokens_per_step", "256", "--epochs", "2", "--eval_interval", "4",
            "--eval_batches", "2", "--log_interval", "1", "--mixed_precision", "no", "--learning_rate", "3e-3",
            "--loss_chunk_size", "16", *extra]


def test_finetune_evaluate_push_and_load_back(base_model, docs, tmp_path):
    data, out = tmp_path / "data", tmp_path / "run"
    with FakeHub(valid_tokens={SECRET}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": SECRET}
        p = run_cli("train", *flags(base_model, docs, data, out, "--push_to_hub", "--hub_model_id",
                                    "user/tiny-ft"), env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        assert f"pushed to {hub.url}/user/tiny-ft" in p.stdout
        # finetuning defaults: evaluation before the first step shows the base model's loss
        evals = read_rows(out, "eval")
        assert evals[0]["step"] == 0 and evals[-1]["val_loss"] < evals[0]["val_loss"]
        meta = json.loads((data / "meta.json").read_text())
        assert meta["tokenizer"]["name_or_path"] == str(base_model)
        # epochs decide the run length: 2 epochs of the train windows at 256 tokens per step
        steps = read_rows(out)[-1]["step"]
        windows = (meta["splits"]["train"]["tokens"] - 1) // 32 - 1
        assert steps == -(-2 * windows // 8)
        pushed = hub.files("user/tiny-ft")
        assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(pushed)

        p = run_cli("eval", out, "--data_dir", data, "--batch_size", "4")
        assert p.returncode == 0, p.stderr[-2000:]
        results = json.loads((out / "eval_results.json").read_text())
        assert results["perplexity"]["loss"] == pytest.approx(json.loads((out / "summary.json").read_text())
                                                              ["final_val_loss"], rel=0.05)
        p = run_cli("push", out, "--repo_id", "user/tiny-ft", env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        dest = hub.write_out("user/tiny-ft", tmp_path / "downloaded")

    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = (dest / "README.md").read_text()
    card = ModelCard(text)
    # a local base model is not a Hub id: named in the text (never its full path), not in metadata
    assert card.data.base_model is None and "fine-tuned from a local model (`tiny-gpt2`)" in text
    assert str(base_model) not in text
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    # local data is no Hub dataset, so no model-index entry claims one; the card's text has the figure
    assert not card.data.eval_results
    assert f"{results['perplexity']['ppl']:.3f}" in text
    model = AutoModelForCausalLM.from_pretrained(dest)
    tok = AutoTokenizer.from_pretrained(dest)
    ids = tok("The lazy dog", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5
    for f in [*out.rglob("*"), *dest.rglob("*")]:  # the token never lands in a file
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in p.stdout + p.stderr


def test_failed_push_never_fails_training(base_model, docs, tmp_path):
    with FakeHub(fail_all=401) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": SECRET}
        p = run_cli("train", *flags(base_model, docs, tmp_path / "d", tmp_path / "r", "--push_to_hub",
                                    "--hub_model_id", "user/x", "--epochs", "0.2"), env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "r/final/model.safetensors").is_file()
    assert "gpt2fit push" in p.stdout and "--repo_id user/x" in p.stdout  # how to push it later


def test_token_files_from_another_tokenizer_are_refused(base_model, docs, tmp_path):
    from gpt2fit.prepare import prepare

    prepare([str(docs)], str(tmp_path / "chars"), tokenizer="char", val_fraction=0.25, quiet=True)
    p = run_cli("train", "finetune-gpt2-medium-12gb", "--init_from", base_model, "--data_dir",
                tmp_path / "chars", "--out_dir", tmp_path / "r", "--block_size", "32", "--micro_batch_size", "4")
    first = p.stderr.strip().splitlines()[0]
    assert p.returncode == 2 and "was prepared with tokenizer" in first
    assert f"--tokenizer {base_model}" in first
    assert not (tmp_path / "r").exists()


def test_push_to_hub_checks_repo_id_and_offline_before_training(base_model, docs, tmp_path):
    p = run_cli("train", *flags(base_model, docs, tmp_path / "d", tmp_path / "r", "--push_to_hub",
                                "--hub_model_id", "no-namespace"))
    assert p.returncode == 2 and "namespace/name" in p.stderr.splitlines()[0]
    p = run_cli("train", *flags(base_model, docs, tmp_path / "d", tmp_path / "r", "--push_to_hub",
                                "--hub_model_id", "user/x"), env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and "HF_HUB_OFFLINE" in p.stderr.splitlines()[0]
    assert not (tmp_path / "r").exists()
