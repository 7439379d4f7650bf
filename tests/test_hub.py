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
             "hellaswag": {"acc": 0.25, "acc_norm": 0.26, "n": 100, "normalization": "length"}}  # fmt: skip
    (run / "eval_results.json").write_text(json.dumps(evals))
    rows = [{"kind": "train", "step": 20, "tokens": 10240, "loss": 5.2, "lr": 6e-5},
            {"kind": "eval", "step": 20, "tokens": 10240, "val_loss": 5.1234, "val_ppl": 167.9}]  # fmt: skip
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "loss.png").write_bytes(_png())
    # complete (formats.complete_checkpoints: a manifest): step_10, step_00000030;
    # incomplete: step_20 (no manifest), .tmp-step_00000040 (interrupted save)
    for name, marker in (("step_10", "MANIFEST.json"), ("step_00000030", "MANIFEST.json"), ("step_20", None),
                         (".tmp-step_00000040", None)):  # fmt: skip
        ck = run / "checkpoints" / name
        ck.mkdir(parents=True)
        (ck / "model.safetensors").write_bytes((run / "final" / "model.safetensors").read_bytes())
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
        assert len(fake.commits) == 1, "model, card and extras go up as one commit"
        assert fake.count("validate_yaml") == 1  # create_commit has the card checked first
        assert set(fake.tokens_seen) == {SECRET}, "the token comes from HF_TOKEN"
        assert SECRET not in json.dumps(fake.requests)
    assert _state(run_dir) == before, "push must not modify the run dir"
    _no_secret_in(run_dir)
    _no_secret_in(out)

    expected = {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                "loss.png", "eval_results.json", "checkpoints/step_10/model.safetensors",
                "checkpoints/step_10/trainer_state.json", "checkpoints/step_00000030/model.safetensors",
                "checkpoints/step_00000030/trainer_state.json"}  # fmt: skip
    assert expected <= set(files)
    local_only = (".bin", ".pkl", "MANIFEST.json")
    assert not [f for f in files if f.endswith(local_only) or "step_20" in f or ".tmp" in f], sorted(files)
    assert files["model.safetensors"] == (run_dir / "final" / "model.safetensors").read_bytes()
    assert {p for p, _ in result.files} == set(files)
    assert result.url == f"{fake.url}/{REPO}"

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("the quick brown", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 4

    text = files["README.md"].decode()
    assert "![training and validation loss](loss.png)" in text
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in text and "pipeline(" in text
    assert "checkpoints/step_10/" in text and "checkpoints/step_00000030/" in text


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
    # eval_results.json (an explicit `gpt2fit eval`) wins over summary.json's final numbers
    assert got[("roneneldan/TinyStories", "loss")] == pytest.approx(5.0)
    assert got[("roneneldan/TinyStories", "perplexity")] == pytest.approx(148.41)
    assert got[("Rowan/hellaswag", "acc")] == pytest.approx(0.25)
    assert got[("Rowan/hellaswag", "acc_norm")] == pytest.approx(0.26)
    assert all(r.task_type == "text-generation" for r in results)

    text = card.text
    assert "10,240" in text  # tokens seen
    assert "| learning_rate | 0.0006 |" in text and "| micro_batch_size | 4 |" in text
    assert "| data_dir | tinystories |" in text and "| tokenizer | tokenizer |" in text
    assert "/home/someone" not in str(card) and "out_dir" not in text and "hub_model_id" not in text
    assert "None" not in str(card) and "nan" not in str(card).lower()
    assert "cpu" in text and "12 s" in text  # units.format_duration


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
    import shutil

    ck = tmp_path / "run" / "checkpoints" / "step_00000030"
    shutil.copytree(run_dir / "checkpoints" / "step_00000030", ck)
    with FakeHub() as fake:
        pusher = hub.BackgroundPusher(REPO, endpoint=fake.url, backoff=0.01, tmp_dir=tmp_path)
        assert pusher.submit(ck, path_in_repo="checkpoints/step_00000030") is True
        shutil.rmtree(ck)  # the trainer rotates it away while the upload may still be running
        assert pusher.finish(timeout=30) == []
        files = fake.files(REPO)
    assert set(files) == {"checkpoints/step_00000030/model.safetensors", "checkpoints/step_00000030/trainer_state.json"}
    assert pusher.pushed == ["checkpoints/step_00000030"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("gpt2fit-push-")] == [], "snapshots cleaned up"


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
    assert "dry run: would push" in out and "checkpoints/step_10/model.safetensors" in out


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
