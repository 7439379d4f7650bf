"""gpt2fit.publish against a fake Hub (tests/hub_server.py): a real HTTP server on 127.0.0.1.

The run dir is a real tiny GPT-2 (2 layers, 32 wide) with a byte-level BPE tokenizer trained
here, so nothing is downloaded and nothing is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import yaml

from gpt2fit.errors import UserError
from gpt2fit.publish import push as hub

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hub_server import FakeHub  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SECRET = "hf_testsecretTOKEN0123456789abcdef"
REPO = "user/tiny-gpt2"


# --------------------------------------------------------------------------- fixtures


def _png() -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _save_tiny_model(final: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    text = ["the quick brown fox jumps over the lazy dog", "once upon a time there was a tiny model"] * 20
    bpe.train_from_iterator(text, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"])
    eot = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=eot, eos_token=eot, unk_token=eot)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=len(tok),
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(final, safe_serialization=True)
    tok.save_pretrained(final)


def _save_checkpoint_weights(final: Path, ck: Path, scale: float) -> None:
    """model.safetensors as Accelerate saves the training CausalLM: keys prefixed "lm.", other values."""
    from safetensors.torch import load_file, save_file

    weights = load_file(final / "model.safetensors")
    save_file({f"lm.{k}": v * scale for k, v in weights.items()}, ck / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished run dir following the contract in gpt2fit/formats.py."""
    run = tmp_path_factory.mktemp("runs") / "quick"
    _save_tiny_model(run / "final")
    config = {
        "init_from": "gpt2", "preset": "tiny", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 64,
        "data_dir": "/home/someone/data/tinystories", "learning_rate": 6.0e-4, "min_lr": 6.0e-5, "warmup_steps": 10,
        "max_steps": 20, "max_tokens": None,
        "micro_batch_size": 4, "grad_accum_steps": 2, "weight_decay": 0.1, "optimizer": "adamw",
        "mixed_precision": "no", "seed": 1337, "tokenizer": "/home/someone/data/tinystories/tokenizer",
        "out_dir": "/home/someone/runs/quick", "hub_model_id": "user/tiny-gpt2", "push_to_hub": True,
    }  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    summary = {"status": "completed", "step": 20, "tokens": 10240, "final_val_loss": 5.1234, "final_val_ppl": 167.9,
               "init_from": "gpt2", "data_dir": "/home/someone/data/tinystories", "n_params": 23456,
               "dataset": "roneneldan/TinyStories",
               "device": "cpu", "wall_time_s": 12.5}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    evals = {"perplexity": {"split": "val", "loss": 5.0, "ppl": 148.41, "tokens": 4096},
             "hellaswag": {"acc": 0.25, "acc_norm": 0.26, "acc_norm_token": 0.27, "n": 100, "text": "lm_eval"},
             "lm_eval": {"hellaswag": {"metrics": {"acc": 0.2891, "acc_stderr": 0.0045, "acc_norm": 0.3114,
                                                   "acc_norm_stderr": 0.0046}, "version": 1.0, "num_fewshot": 0,
                                       "samples": 10042, "dataset": "Rowan/hellaswag", "limit": None,
                                       "lm_eval_version": "0.4.13"},
                         "tiny_local": {"metrics": {"acc": 0.5}, "version": 2, "num_fewshot": 5, "samples": 6,
                                        "dataset": "json", "limit": None, "lm_eval_version": "0.4.13"}}}  # fmt: skip
    (run / "eval_results.json").write_text(json.dumps(evals))
    rows = [{"kind": "train", "step": 20, "tokens": 10240, "loss": 5.2, "lr": 6e-5},
            {"kind": "eval", "step": 20, "tokens": 10240, "val_loss": 5.1234, "val_ppl": 167.9}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "loss.png").write_bytes(_png())
    (run / "gpt2fit").mkdir()  # Accelerate's TensorBoard tracker writes <out_dir>/gpt2fit/events.out.tfevents.*
    (run / "gpt2fit" / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"tensorboard events")
    # complete (formats.complete_checkpoints: a manifest): step_10, step_00000030;
    # incomplete: step_20 (no manifest), .tmp-step_00000040 (interrupted save)
    for i, (name, marker) in enumerate((("step_10", "MANIFEST.json"), ("step_00000030", "MANIFEST.json"),
                                        ("step_20", None), (".tmp-step_00000040", None))):  # fmt: skip
        ck = run / "checkpoints" / name
        ck.mkdir(parents=True)
        _save_checkpoint_weights(run / "final", ck, scale=0.5 * (i + 1))
        (ck / "optimizer.bin").write_bytes(b"optimizer state pickle")
        (ck / "random_states_0.pkl").write_bytes(b"rng pickle")
        (ck / "trainer_state.json").write_text(json.dumps({"step": 10, "position": 640}))
        if marker:
            (ck / marker).write_text("{}")
    return run


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """The suite runs with HF_HUB_OFFLINE=1, which huggingface_hub 2.x reads once at import and
    then enforces on *every* request (HfApi too). The fake Hub is local, so lift it here."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", SECRET)


def _state(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under root: (sha256, mtime_ns)."""
    return {
        p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _no_secret_in(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            assert SECRET.encode() not in p.read_bytes(), p


# --------------------------------------------------------------------------- push_run


def test_push_run_uploads_a_loadable_model_with_card(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    before = _state(run_dir)
    with FakeHub(valid_tokens={SECRET}) as fake:
        result = hub.push_run(run_dir, REPO, private=True, revision=None, include_checkpoints=True, endpoint=fake.url)
        files = fake.files(REPO)
        out = fake.write_out(REPO, tmp_path / "pulled")
        assert fake.repos[REPO]["private"] is True
        main_commits = [c for c in fake.commits if c["revision"] == "main"]
        assert len(main_commits) == 1, "model, card and extras go up as one commit"
        assert [c["revision"] for c in fake.commits[1:]] == ["step10", "step30"]  # one commit per checkpoint branch
        assert fake.count("validate_yaml") == 1  # create_commit has the card checked first
        assert set(fake.tokens_seen) == {SECRET}, "the token comes from HF_TOKEN"
        assert SECRET not in json.dumps(fake.requests)
        branches = {rev: fake.files(REPO, rev) for rev in ("step10", "step30")}
    assert _state(run_dir) == before, "push must not modify the run dir"
    _no_secret_in(run_dir)
    _no_secret_in(out)

    model_dir = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    extras = {"README.md", "loss.png", "eval_results.json", "gpt2fit/events.out.tfevents.1700000000.host.1.0"}
    expected = model_dir | extras
    assert set(files) == expected
    assert files["model.safetensors"] == (run_dir / "final" / "model.safetensors").read_bytes()
    assert {p for p, _ in result.files} == set(files) | {f"{rev}:{p}" for rev, fs in branches.items() for p in fs}
    assert result.url == f"{fake.url}/{REPO}"
    # a checkpoint's branch is a complete model dir, and only that (nothing of main's card, plot, results)
    for rev, fs in branches.items():
        assert set(fs) == model_dir, rev
        assert fs["config.json"] == files["config.json"]

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("the quick brown", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4

    text = files["README.md"].decode()
    assert "![training and validation loss](loss.png)" in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in text and "pipeline(" in text
    assert f'from_pretrained("{REPO}", revision="step30")' in text and "- `step10`" in text


def test_checkpoint_branches_load_by_revision(run_dir, tmp_path):
    """from_pretrained(repo, revision="step10") in a fresh process, against the local Hub: the
    checkpoint's own weights (not final/'s), under the names transformers expects."""
    import torch
    from safetensors.torch import load_file

    with FakeHub() as fake:
        hub.push_run(run_dir, REPO, include_checkpoints=True, endpoint=fake.url, license="mit")
        code = ("import sys, torch; from transformers import AutoModelForCausalLM, AutoTokenizer; "
                f"m = AutoModelForCausalLM.from_pretrained('{REPO}', revision='step10'); "
                f"t = AutoTokenizer.from_pretrained('{REPO}', revision='step10'); "
                "torch.save({k: v for k, v in m.state_dict().items()}, sys.argv[1]); print(t.model_max_length)")
        env = dict(os.environ, HF_ENDPOINT=fake.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"))
        p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "sd.pt")], env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    loaded = torch.load(tmp_path / "sd.pt")
    saved = load_file(run_dir / "checkpoints" / "step_10" / "model.safetensors")
    assert set(saved) == {f"lm.{k}" for k in loaded if k != "lm_head.weight"}
    for k, v in saved.items():
        assert torch.equal(loaded[k.removeprefix("lm.")], v), k


def test_model_card_metadata_and_model_index(run_dir):
    from huggingface_hub import ModelCard
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = ModelCard(str(hub.build_model_card(run_dir, repo_id=REPO, license="apache-2.0")))
    data = card.data
    assert data.base_model == "openai-community/gpt2"
    assert data.datasets == ["roneneldan/TinyStories"]
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"
    assert {"gpt2", "gpt2fit"} <= set(data.tags)

    meta = yaml.safe_load(str(card).split("---")[1])
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "tiny-gpt2"
    got = {(r.dataset_type, r.metric_type): r.metric_value for r in results}
    # eval_results.json (an explicit `gpt2fit eval`) wins over summary.json's final numbers; lm-eval's
    # results on Hub datasets (not the built-in scorer's, not a local dataset's, no stderr)
    assert got == pytest.approx({("roneneldan/TinyStories", "loss"): 5.0, ("roneneldan/TinyStories", "perplexity"):
                                 148.41, ("Rowan/hellaswag", "acc"): 0.2891, ("Rowan/hellaswag", "acc_norm"): 0.3114})
    assert all(r.task_type == "text-generation" for r in results)

    text = card.text
    assert "10,240" in text  # tokens seen
    assert "| learning_rate | 0.0006 |" in text and "| micro_batch_size | 4 |" in text
    assert "| data_dir | tinystories |" in text and "| tokenizer | tokenizer |" in text
    assert "/home/someone" not in str(card) and "out_dir" not in text and "hub_model_id" not in text
    assert "None" not in str(card) and "nan" not in str(card).lower()
    assert "cpu" in text and "12 s" in text  # units.format_duration
    assert "**Precision:** fp32" in text and "GPU hours" not in text and "FLOPs" not in text  # config's "no"
    assert "| hellaswag | 1 | 0 | 10,042 | acc_norm | 0.3114 | 0.0046 |" in text
    assert "| tiny_local | 2 | 5 | 6 | acc | 0.5000 |  |" in text and "lm-eval 0.4.13" in text
    assert "| HellaSwag acc_norm (built-in scorer) | 0.2600 |" in text and "lm_eval text" in text
    assert "## How to use" in text


def test_model_card_states_what_ran(run_dir, tmp_path):
    """Precision and device from summary.json (what ran, not the config's "auto"), compute, and an
    lm-eval run on a subset named as such; a built-in HellaSwag result of the old scorer is left out."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("checkpoints"))
    summary = json.loads((run / "summary.json").read_text())
    summary.update(mixed_precision="bf16", device="NVIDIA GeForce RTX 4090", num_processes=2, wall_time_s=5400,
                   flops_per_token=6.0e8, dataset="/home/someone/corpus.txt")
    (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text(yaml.safe_dump({"mixed_precision": "auto"}))
    evals = json.loads((run / "eval_results.json").read_text())
    evals["hellaswag"] = {"acc": 0.25, "acc_norm": 0.29, "n": 100, "normalization": "per-token"}
    evals["lm_eval"]["hellaswag"]["limit"] = 100
    (run / "eval_results.json").write_text(json.dumps(evals))
    card = hub.build_model_card(run, repo_id=REPO)
    text = card.text
    assert "**Precision:** bf16 mixed precision" in text and "× 2 processes" in text
    assert "6.14e+12 FLOPs" in text and "3 GPU hours" in text
    assert "HellaSwag" not in text.split("lm-evaluation-harness")[0]  # the old scorer's numbers
    assert "hellaswag: the first 100 examples only, not comparable" in text
    assert "model-index" not in str(card)  # a local dataset and a subset: nothing others could compare
    assert card.data.license is None and card.data.datasets is None


def test_model_card_handles_a_bare_run(tmp_path, run_dir):
    """Only final/ and a config from scratch; junk numbers are left out, not printed as None/nan."""
    run = tmp_path / "bare"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "config.yaml").write_text(yaml.safe_dump({"init_from": None, "n_layer": 2, "max_tokens": None}))
    (run / "summary.json").write_text('{"status": "interrupted", "step": 7, "final_val_loss": NaN}')
    card = hub.build_model_card(run)
    text = str(card)
    assert "trained from scratch" in text
    assert "interrupted" in text and "step 7" in text
    assert "model-index" not in text and "base_model" not in text and "datasets" not in text
    assert "license" not in text  # none given, no base model to take it from
    assert "None" not in text and "NaN" not in text and "nan" not in text.lower()
    assert "loss.png" not in text
    assert "path/to/this/model" in text  # usage snippet without a repo id


def test_model_card_with_prepare_inputs_as_dataset(tmp_path):
    """summary.json's dataset is the list of `gpt2fit prepare` inputs: local paths, globs, names."""
    run = tmp_path / "listed"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    (run / "summary.json").write_text(json.dumps({"dataset": ["/home/someone/corpus/*.txt", "stdlib", "notes/a.txt"]}))
    text = str(hub.build_model_card(run, repo_id=REPO))
    assert "`*.txt, stdlib, a.txt`" in text
    assert "/home/someone" not in text and "datasets:" not in text


# --------------------------------------------------------------------------- retries and errors


def test_5xx_is_retried_with_backoff_then_succeeds(run_dir):
    sleeps: list[float] = []
    with FakeHub(fail_first={"create_repo": 2, "commit": 1}) as fake:
        info = hub.push_folder(run_dir / "final", REPO, endpoint=fake.url, retries=3, backoff=0.01,
                               sleep=sleeps.append)  # fmt: skip
        # the whole create-repo + commit sequence is retried: a failed commit retries create_repo too
        assert fake.count("create_repo") == 4 and fake.count("create_repo", 503) == 2
        assert fake.count("commit", 503) == 1 and fake.count("commit", 200) == 1
        assert "model.safetensors" in fake.files(REPO)
    assert sleeps == [0.01, 0.02, 0.04]
    assert info.commit_url.startswith(fake.url)


def test_persistent_5xx_gives_up_with_a_clear_error(run_dir):
    sleeps: list[float] = []
    with FakeHub(fail_first={"create_repo": (99, 503)}) as fake:
        with pytest.raises(UserError) as err:
            hub.push_folder(run_dir / "final", REPO, endpoint=fake.url, retries=2, backoff=0.01, sleep=sleeps.append)
        assert fake.count("create_repo") == 3
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"push to '{REPO}' failed after 3 attempts: 503 Service Unavailable")
    assert sleeps == [0.01, 0.02]


def test_network_errors_are_retried_then_explained(run_dir):
    """huggingface_hub 1.x lets httpx's transport errors through, 2.x httpx2's: both are retried."""
    import socket

    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    sleeps: list[float] = []
    with pytest.raises(UserError) as err:
        hub.push_folder(run_dir / "final", REPO, endpoint=f"http://127.0.0.1:{port}", retries=2, backoff=0.01,
                        sleep=sleeps.append)  # fmt: skip
    assert sleeps == [0.01, 0.02]
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"push to '{REPO}' failed after 3 attempts: cannot reach http://127.0.0.1:{port}")


def test_401_fails_at_once_with_the_fix(run_dir):
    before = _state(run_dir)
    with FakeHub(valid_tokens={"hf_someoneelsesTOKEN123"}) as fake:
        with pytest.raises(UserError) as err:
            hub.push_run(run_dir, REPO, private=False, revision=None, endpoint=fake.url, backoff=0.01)
        assert fake.count("create_repo") == 1, "401 must not be retried"
        assert fake.count("preupload") == 0 and fake.count("commit") == 0
    first = str(err.value).splitlines()[0]
    assert first.startswith(f"push to '{REPO}' failed: 401 Unauthorized")
    assert "HF_TOKEN" in first and "hf auth login" in first
    assert SECRET not in str(err.value)
    assert _state(run_dir) == before


def test_401_without_any_token_says_so(run_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-stored-token"))
    with FakeHub(valid_tokens={SECRET}) as fake:
        with pytest.raises(UserError, match="no token was found"):
            hub.push_folder(run_dir / "final", REPO, endpoint=fake.url, backoff=0.01)
        assert fake.tokens_seen == [] and fake.count("create_repo") == 1


def test_offline_mode_is_refused_before_any_request(run_dir, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with FakeHub() as fake:
        with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
            hub.push_folder(run_dir / "final", REPO, endpoint=fake.url)
        assert fake.requests == []


@pytest.mark.parametrize("bad", ["", "no-namespace", "a/b/c", "user/bad name"])
def test_bad_repo_id_is_a_user_error(run_dir, bad):
    with pytest.raises(UserError, match="repo"):
        hub.push_run(run_dir, bad, private=False, revision=None, endpoint="http://127.0.0.1:9")


def test_push_to_a_branch(run_dir):
    with FakeHub() as fake:
        result = hub.push_run(run_dir, REPO, private=False, revision="exp-1", endpoint=fake.url)
        assert fake.count("create_branch") == 1
        assert "README.md" in fake.files(REPO, "exp-1") and fake.files(REPO, "main") == {}
        readme = fake.files(REPO, "exp-1")["README.md"].decode()
    assert result.url.endswith("/tree/exp-1")
    assert 'revision="exp-1"' in readme


def test_push_folder_without_hf_xet(run_dir, monkeypatch):
    """create_commit with HF_HUB_DISABLE_XET (as without hf_xet installed), under a path_in_repo."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with FakeHub() as fake:
        hub.push_folder(run_dir / "final", REPO, endpoint=fake.url, path_in_repo="weights")
        assert fake.count("commit", 200) == 1
        assert "weights/model.safetensors" in fake.files(REPO)


# --------------------------------------------------------------------------- background pushes


def test_background_pusher_snapshots_before_rotation(run_dir, tmp_path):
    """During training a checkpoint goes up as a complete model dir on its branch, made from the
    (model, tokenizer) being trained (there is no final/ yet), before the trainer rotates it away."""
    import shutil

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    template = (AutoModelForCausalLM.from_pretrained(run_dir / "final"), AutoTokenizer.from_pretrained(run_dir / "final"))
    ck = tmp_path / "run" / "checkpoints" / "step_00000030"
    shutil.copytree(run_dir / "checkpoints" / "step_00000030", ck)
    with FakeHub() as fake:
        pusher = hub.BackgroundPusher(REPO, endpoint=fake.url, backoff=0.01, tmp_dir=tmp_path, template=template)
        assert pusher.submit(ck, path_in_repo="ignored/for/checkpoints") is True
        shutil.rmtree(ck)  # the trainer rotates it away while the upload may still be running
        assert pusher.finish(timeout=30) == []
        files = fake.files(REPO, "step30")
        assert fake.files(REPO) == {}
    assert set(files) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                          "tokenizer_config.json"}  # fmt: skip
    assert json.loads(files["tokenizer_config.json"])["model_max_length"] == 64
    weights = {k: v for k, v in load_file(run_dir / "checkpoints" / "step_00000030" / "model.safetensors").items()}
    (tmp_path / "w.safetensors").write_bytes(files["model.safetensors"])
    assert {f"lm.{k}" for k in load_file(tmp_path / "w.safetensors")} == set(weights)
    assert pusher.pushed == ["step30"] and pusher.revisions == ["step30"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("gpt2fit-push-")] == [], "snapshots cleaned up"
    # without the model being trained and before final/ exists: recorded, never a branch of bare weights
    shutil.copytree(run_dir / "checkpoints" / "step_10", ck.parent / "step_10")
    with FakeHub() as fake:
        pusher = hub.BackgroundPusher(REPO, endpoint=fake.url, tmp_dir=tmp_path)
        assert pusher.submit(ck.parent / "step_10") is False and fake.commits == []
    assert "no model dir" in pusher.failures[0].error and "--include_checkpoints" in pusher.failures[0].command


def test_background_pusher_pushes_a_whole_run_with_its_card(run_dir):
    before = _state(run_dir)
    with FakeHub() as fake:
        with hub.BackgroundPusher(REPO, endpoint=fake.url, backoff=0.01) as pusher:
            assert pusher.submit(run_dir, commit_message="final model", run_dir=True)
        files = fake.files(REPO)
        assert fake.commits[-1]["summary"] == "final model"
    assert pusher.failures == []
    assert {"README.md", "model.safetensors", "tokenizer.json", "loss.png", "eval_results.json"} <= set(files)
    assert not [f for f in files if f.startswith("checkpoints/")]
    assert b"model-index" in files["README.md"]
    assert _state(run_dir) == before


def test_background_pusher_records_failures_and_never_raises(run_dir, tmp_path):
    with FakeHub(fail_all=401) as fake:
        pusher = hub.BackgroundPusher(REPO, private=True, endpoint=fake.url, retries=2, backoff=0.01)
        assert pusher.submit(run_dir / "final") is True
        assert pusher.submit(tmp_path / "gone") is False  # never raises, even for a missing folder
        failures = pusher.finish(timeout=30)
        assert fake.count("create_repo") == 1
    assert pusher.submit(run_dir / "final") is False  # after finish(): recorded, not raised
    assert len(failures) == 2 and pusher.pushed == []
    final = next(f for f in failures if f.folder == str(run_dir / "final"))
    assert "401 Unauthorized" in final.error
    assert final.command == f"gpt2fit push {run_dir} --repo_id {REPO} --private"
    report = pusher.report()
    assert f"gpt2fit push {run_dir} --repo_id {REPO} --private" in report
    assert "scripts/push_to_hub.py" in report and "not pushed" in report
    assert SECRET not in report


def test_background_pusher_finish_timeout_reports_what_did_not_finish(run_dir, tmp_path):
    with FakeHub(delay={"commit": 1.0}) as fake:
        pusher = hub.BackgroundPusher(REPO, endpoint=fake.url, backoff=0.01, tmp_dir=tmp_path)
        assert pusher.submit(run_dir / "final", path_in_repo="a") and pusher.submit(run_dir / "final", path_in_repo="b")
        failures = pusher.finish(timeout=0.1)  # "a" is in flight, "b" has not started: dropped
        assert [f.path_in_repo for f in failures] == ["a", "b"] and pusher.pushed == []
        assert all("finish() stopped waiting after 0.1s" in f.error for f in failures)
        assert len(list(tmp_path.glob("gpt2fit-push-*"))) <= 1, "the dropped upload's snapshot is removed"
        assert pusher.submit(run_dir / "final") is False
    assert f"gpt2fit push {run_dir} --repo_id {REPO}" in pusher.report()


def test_redact():
    assert hub.redact(f"Authorization: Bearer {SECRET} ok") == "Authorization: Bearer hf_*** ok"
    assert hub.redact("hf_short stays") == "hf_short stays"


# --------------------------------------------------------------------------- CLI


def test_cli_push_prints_files_and_url(run_dir, capsys):
    with FakeHub() as fake:
        rc = hub.main([str(run_dir), "--repo_id", REPO, "--endpoint", fake.url, "--license", "mit"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"model: {fake.url}/{REPO}" in out and "README.md" in out and "model.safetensors" in out


def test_cli_dry_run_needs_no_network(run_dir, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub.main([str(run_dir), "--repo_id", REPO, "--dry_run", "--include_checkpoints"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("---\nbase_model: openai-community/gpt2")
    assert "dry run: would push" in out and "step10:model.safetensors" in out and "step30:config.json" in out
    assert "license:" not in out.split("---")[1]  # the base model's is read when pushing, not in a dry run


def test_license_comes_from_the_base_models_card(run_dir):
    with FakeHub() as fake:
        fake.add_repo("openai-community/gpt2", {"README.md": b"---\nlicense: mit\n---\n# gpt2\n"})
        hub.push_run(run_dir, REPO, endpoint=fake.url)
        assert "license: mit" in fake.files(REPO)["README.md"].decode()
        hub.push_run(run_dir, REPO, endpoint=fake.url, license="apache-2.0")  # --license wins
        assert "license: apache-2.0" in fake.files(REPO)["README.md"].decode()
        fake.repos.pop("openai-community/gpt2")  # unreadable: no license rather than a wrong one
        hub.push_run(run_dir, REPO, endpoint=fake.url)
        assert "license" not in fake.files(REPO)["README.md"].decode().split("---")[1]


def test_cli_errors_exit_2_with_error_first(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    missing = subprocess.run(
        [sys.executable, "-m", "gpt2fit.cli", "push", str(tmp_path / "missing"), "--repo_id", REPO],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    assert missing.returncode == 2, missing.stderr
    assert missing.stderr.splitlines()[0].startswith("error: run dir") and "does not exist" in missing.stderr

    (tmp_path / "unfinished" / "checkpoints").mkdir(parents=True)
    (tmp_path / "unfinished" / "config.yaml").write_text("n_layer: 2\n")
    script = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts/push_to_hub.py"), str(tmp_path / "unfinished"), "--repo_id", REPO],
        capture_output=True, text=True, env=env, cwd=REPO_ROOT,
    )  # fmt: skip
    assert script.returncode == 2, script.stderr
    assert script.stderr.splitlines()[0].startswith("error:") and "gpt2fit train" in script.stderr


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        hub.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    flags = ("--repo_id", "--private", "--revision", "--include_checkpoints", "--license", "--endpoint", "--dry_run")
    assert all(flag in out for flag in flags)
    with pytest.raises(UserError, match="(?i)required: run_dir"):  # usage errors are UserErrors too
        hub.main([])
