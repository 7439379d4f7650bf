"""Bad input, as a user meets it: exit status 2, a first stderr line ``error: <what and how to fix>``,
and nothing that existed before is touched (a finished run dir and the data dir stay byte-identical).

Every case runs ``python -m gpt2fit.cli ...`` in a fresh process. The cases are independent, so a
module fixture runs them all up front, a few at a time, and one test per case checks its result.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_flags
from gpt2fit.train.command import main as train_main

ENV = {"OMP_NUM_THREADS": "1"}  # many short processes on a small shared CPU
WORKERS = 3


def snapshot(*dirs: Path) -> dict:
    """Every file and directory under ``dirs``: path -> sha256 (files) or 'dir'."""
    out = {}
    for d in dirs:
        d = Path(d)
        if not d.exists():
            out[str(d)] = "absent"
            continue
        for p in sorted(d.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def tiny_model(path: Path, **cfg) -> Path:
    """A tiny GPT-2 model dir saved with save_pretrained (safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    kw = dict(n_layer=1, n_head=2, n_embd=16, n_positions=64, vocab_size=128)
    kw.update(cfg)
    GPT2LMHeadModel(GPT2Config(**kw)).save_pretrained(path)
    return path


def no_shape(**over) -> dict:
    """tiny_flags overrides for an init_from run (the model's own shape)."""
    return dict(n_layer=None, n_head=None, n_embd=None, **over)


@dataclass
class Case:
    id: str
    argv: list
    fragment: str  # must appear in the first stderr line
    untouched: list = field(default_factory=list)  # dirs this case points at, byte-identical after
    absent: list = field(default_factory=list)  # paths the failed command must not create


@dataclass
class World:
    good_run: Path
    data: Path
    cases: dict
    results: dict
    before: dict
    after: dict


@pytest.fixture(scope="module")
def world(char_data, tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("bad")
    good_run = root / "good_run"
    assert train_main(tiny_flags(char_data, good_run, max_steps=4, checkpoint_interval=2, keep_checkpoints=2)) == 0
    assert sorted(p.name for p in (good_run / "checkpoints").iterdir()) == ["step_00000002", "step_00000004"]
    meta = json.loads((char_data / "meta.json").read_text())
    train_bytes = (char_data / "train.bin").stat().st_size

    def data_copy(name: str, edit) -> Path:
        d = root / name
        shutil.copytree(char_data, d)
        edit(d)
        return d

    def write_meta(d: Path, change) -> None:
        m = json.loads(json.dumps(meta))
        change(m)
        (d / "meta.json").write_text(json.dumps(m))

    def truncate(path: Path, size: int) -> None:
        with open(path, "r+b") as fh:
            fh.truncate(size)

    empty_dir = root / "empty_data"
    empty_dir.mkdir()
    d_empty_tokens = data_copy("empty_tokens", lambda d: truncate(d / "train.bin", 0))
    d_truncated = data_copy("truncated_tokens", lambda d: truncate(d / "train.bin", train_bytes - 200))
    d_odd = data_copy("odd_length", lambda d: open(d / "train.bin", "ab").write(b"\x01"))
    val_tokens = meta["splits"]["val"]["tokens"]
    d_count = data_copy("count_mismatch",
                        lambda d: write_meta(d, lambda m: m["splits"]["val"].update(tokens=val_tokens + 7)))
    d_badjson = data_copy("bad_json", lambda d: (d / "meta.json").write_text('{"dtype": "uint16", "tokenizer": {'))
    d_nokeys = data_copy("meta_no_keys", lambda d: (d / "meta.json").write_text('{"dtype": "uint16"}'))
    d_noval = data_copy("no_val", lambda d: (d / "val.bin").unlink())
    d_badtok = data_copy("bad_tokenizer", lambda d: (d / "tokenizer" / "tokenizer.json").write_text("\x00garbage{"))

    def poke_id(d: Path, token_id: int) -> None:  # one token id past the vocab, mid-file
        ids = np.fromfile(d / "train.bin", dtype=np.uint16)
        ids[len(ids) // 2] = token_id
        ids.tofile(d / "train.bin")

    vocab = meta["tokenizer"]["vocab_size"]
    d_big_id = data_copy("id_past_vocab", lambda d: poke_id(d, vocab + 5))
    d_small_vocab = data_copy("meta_vocab_too_small",
                              lambda d: write_meta(d, lambda m: m["tokenizer"].update(vocab_size=vocab // 2)))

    def one_val_token(d: Path) -> None:
        (d / "val.bin").write_bytes(np.array([1], dtype=np.uint16).tobytes())
        write_meta(d, lambda m: m["splits"]["val"].update(tokens=1))

    d_tiny_val = data_copy("tiny_val", one_val_token)
    missing_tracker = next(t for t in ("wandb", "trackio") if importlib.util.find_spec(t) is None)
    a_file = root / "a_file"
    a_file.write_text("not a directory\n")

    models = root / "models"
    small_vocab = tiny_model(models / "small_vocab", vocab_size=20)
    short_ctx = tiny_model(models / "short_ctx", n_positions=16)
    no_config = tiny_model(models / "no_config")
    (no_config / "config.json").unlink()
    no_weights = tiny_model(models / "no_weights")
    (no_weights / "model.safetensors").unlink()
    pickle_only = tiny_model(models / "pickle_only")  # weights only as a pickle: never loaded
    from safetensors.torch import load_file

    torch.save(load_file(pickle_only / "model.safetensors"), pickle_only / "pytorch_model.bin")
    (pickle_only / "model.safetensors").unlink()
    cut_weights = tiny_model(models / "cut_weights")
    truncate(cut_weights / "model.safetensors", (cut_weights / "model.safetensors").stat().st_size // 2)
    wrong_config = tiny_model(models / "wrong_config", vocab_size=128)
    cfg_json = json.loads((wrong_config / "config.json").read_text())
    (wrong_config / "config.json").write_text(json.dumps({**cfg_json, "n_embd": 32}))
    not_gpt2 = models / "not_gpt2"
    not_gpt2.mkdir(parents=True)
    (not_gpt2 / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (not_gpt2 / "model.safetensors").write_bytes(b"")

    def run_copy(name: str, edit) -> Path:
        d = root / name
        shutil.copytree(good_run, d)
        edit(d)
        return d

    ck = "checkpoints/step_00000004"
    damaged = run_copy("damaged_run", lambda d: truncate(d / ck / "model.safetensors",
                                                         (d / ck / "model.safetensors").stat().st_size // 2))
    no_manifest = run_copy("no_manifest_run", lambda d: (d / ck / "MANIFEST.json").unlink())
    zeroed = run_copy("zeroed_optimizer_run", lambda d: (d / ck / "optimizer.bin").write_bytes(
        bytes((d / ck / "optimizer.bin").stat().st_size)))  # same size, every byte 0
    bad_final = run_copy("bad_final_run", lambda d: (d / "final" / "model.safetensors").write_bytes(
        b"\xff" * (d / "final" / "model.safetensors").stat().st_size))

    recipes = root / "recipes"
    recipes.mkdir()
    (recipes / "typo.yaml").write_text("n_layer: 2\nlearnin_rate: 1.0e-3\n")
    (recipes / "broken.yaml").write_text("n_layer: [2\nmax_steps: 3\n")
    (recipes / "wrongtype.yaml").write_text("max_steps: lots\n")

    bad_text = root / "texts"
    bad_text.mkdir()
    (bad_text / "empty.txt").write_text("   \n")
    from gpt2fit.prepare.tokenizers import build_char_tokenizer

    char_tok = root / "char_tokenizer"
    build_char_tokenizer(["abc"]).save_pretrained(char_tok)

    def new(name: str) -> Path:
        return root / "new" / name

    def T(name, fragment, data=char_data, untouched=(), out=None, **over):
        out = out or new(name)
        return Case(name, ["train", *tiny_flags(data, out, max_steps=over.pop("max_steps", 3), **over)], fragment,
                    [data, *untouched] if data != char_data else list(untouched),
                    [] if out in (good_run, damaged, no_manifest, zeroed, a_file) else [out])

    cases = [
        # data dir
        T("missing_data_dir", "does not exist; prepare it first", data=root / "nope"),
        T("empty_data_dir", "meta.json is missing", data=empty_dir),
        T("empty_token_file", "train.bin is empty", data=d_empty_tokens),
        T("truncated_token_file", f"holds {train_bytes - 200} bytes but meta.json says {train_bytes // 2} uint16",
          data=d_truncated),
        T("odd_length_token_file", f"holds {train_bytes + 1} bytes", data=d_odd),
        T("meta_count_mismatch", f"val.bin holds {val_tokens * 2} bytes but meta.json says {val_tokens + 7} uint16 "
                                 "tokens", data=d_count),
        T("meta_invalid_json", "meta.json is corrupt", data=d_badjson),
        T("meta_missing_keys", "meta.json is corrupt", data=d_nokeys),
        T("missing_val_file", "val.bin is missing", data=d_noval),
        T("corrupt_tokenizer", "cannot load tokenizer", data=d_badtok),
        T("token_id_past_vocab", f"holds token id {vocab + 5} but the model's vocabulary has {vocab} ids",
          data=d_big_id),
        T("meta_vocab_too_small", f"but the model's vocabulary has {vocab // 2} ids", data=d_small_vocab),
        T("val_split_too_short", "val.bin holds 1 token(s); validation needs at least 2", data=d_tiny_val),
        # numbers that are not numbers, paths of the wrong kind, trackers that are not installed
        T("learning_rate_nan", "learning_rate=nan in the command line is not a finite number", learning_rate="nan"),
        T("max_steps_inf", "max_steps='inf' in the command line is not a valid int", max_steps="inf"),
        T("seed_negative", "seed=-1 must not be negative", seed=-1),
        T("seed_too_large", f"seed={2**40} must be <= {2**32 - 1}", seed=2**40),
        T("out_dir_is_a_file", "is a file, not a directory", out=a_file, untouched=[a_file]),
        T("hellaswag_ending_longer_than_model", "tokens, more than the model's 32 positions",
          hellaswag=Path(__file__).parent / "fixtures" / "hellaswag_tiny.jsonl"),
        T("tracker_not_installed", f"report_to={missing_tracker} needs the {missing_tracker} package",
          report_to=missing_tracker),
        # init_from
        T("init_from_truncated_weights", f"{cut_weights / 'model.safetensors'} is damaged", untouched=[cut_weights],
          **no_shape(init_from=cut_weights)),
        T("init_from_config_mismatch", f"{wrong_config / 'config.json'} does not match the weights",
          untouched=[wrong_config], **no_shape(init_from=wrong_config)),
        T("vocab_mismatch", "the data's vocab (97) is larger than", untouched=[small_vocab],
          **no_shape(init_from=small_vocab)),
        T("block_size_above_n_positions", "block_size=32 exceeds", untouched=[short_ctx],
          **no_shape(init_from=short_ctx)),
        T("init_from_no_config", "is missing config.json", untouched=[no_config], **no_shape(init_from=no_config)),
        T("init_from_no_weights", "missing *.safetensors weights", untouched=[no_weights],
          **no_shape(init_from=no_weights)),
        T("init_from_pickle_only", "missing *.safetensors weights", untouched=[pickle_only],
          **no_shape(init_from=pickle_only)),
        T("init_from_not_gpt2", "is a 'bert' model", untouched=[not_gpt2], **no_shape(init_from=not_gpt2)),
        # recipes and flags
        Case("unknown_recipe", ["train", "quickstrat", "--max_steps", "2"],
             "unknown recipe 'quickstrat'. Did you mean 'quickstart'?"),
        Case("missing_recipe_file", ["train", str(recipes / "nope.yaml")], "recipe file"),
        Case("unknown_recipe_key", ["train", str(recipes / "typo.yaml"), "--max_steps", "2"],
             "unknown key 'learnin_rate' in recipe"),
        Case("recipe_invalid_yaml", ["train", str(recipes / "broken.yaml")], "is not valid YAML"),
        Case("recipe_wrong_type", ["train", str(recipes / "wrongtype.yaml")], "max_steps='lots' in recipe"),
        T("unknown_flag", "unknown flag --learnin_rate. Did you mean 'learning_rate'", learnin_rate="1e-3"),
        T("int_given_text", "max_steps='abc' in the command line is not a valid int", max_steps="abc"),
        T("float_given_text", "learning_rate='x' in the command line is not a valid float", learning_rate="x"),
        T("bool_given_text", "grad_checkpointing='maybe'", grad_checkpointing="maybe"),
        T("bad_choice", "optimizer='adam' in the command line is not one of", optimizer="adam"),
        T("micro_batch_zero", "micro_batch_size=0 must be a positive integer", micro_batch_size=0),
        T("learning_rate_negative", "learning_rate=-1.0 must not be negative", learning_rate=-1),
        T("block_size_zero", "block_size=0 must be a positive integer", block_size=0),
        T("max_steps_negative", "max_steps=-5 must be a positive integer", max_steps=-5),
        T("no_stopping_point", "no stopping point", max_steps=None),
        T("host_sync_log_with_8bit", "host_sync=log skips non-finite updates inside fused torch AdamW, which "
                                     "optimizer='adamw8bit' does not use", host_sync="log", optimizer="adamw8bit"),
        T("muon_learning_rate_zero", "muon_learning_rate=0 would never update the block matrices",
          optimizer="muon", muon_learning_rate=0),
        T("muon_flag_with_8bit_adamw", "--muon_learning_rate applies to --optimizer muon, not 'adamw8bit'",
          optimizer="adamw8bit", muon_learning_rate="1e-3"),
        T("muon_momentum_out_of_range", "muon_momentum=1.5 must be <= 0.999", optimizer="muon", muon_momentum=1.5),
        T("bias_false_with_init_from", "bias=false applies to models built from scratch", untouched=[short_ctx],
          **no_shape(init_from=short_ctx, bias="false")),
        # out_dir and resume
        T("out_dir_holds_a_run", "already holds a run; pass --resume auto", out=good_run, untouched=[good_run]),
        T("resume_and_overwrite", "contradict", out=good_run, resume="auto", overwrite="true"),
        T("resume_changed_model_shape", "the model shape changed (n_layer: 2 -> 3)", out=good_run,
          resume="auto", n_layer=3),
        T("resume_missing_path", "no such checkpoint dir", out=good_run, resume=good_run / "checkpoints/step_9"),
        T("resume_truncated_safetensors",
          f"{damaged / ck} is damaged: model.safetensors is", out=damaged, untouched=[damaged], resume=damaged / ck),
        T("resume_zeroed_optimizer_same_size", "optimizer.bin does not match the hash recorded when it was saved",
          out=zeroed, untouched=[zeroed], resume=zeroed / ck),
        Case("eval_damaged_final", ["eval", bad_final, "--data_dir", char_data],
             f"{bad_final / 'final' / 'model.safetensors'} is damaged", untouched=[bad_final]),
        Case("sample_damaged_final", ["sample", bad_final, "--max_new_tokens", "3"],
             f"{bad_final / 'final' / 'model.safetensors'} is damaged", untouched=[bad_final]),
        T("resume_path_without_manifest", "is incomplete (no MANIFEST.json)", out=no_manifest,
          untouched=[no_manifest], resume=no_manifest / ck),
        # prepare
        Case("prepare_missing_input", ["prepare", "--input", str(root / "nothing.txt"), "--out_dir", new("p1"),
                                       "--tokenizer", "char"], "does not exist", absent=[new("p1")]),
        Case("prepare_no_text", ["prepare", "--input", str(bad_text), "--out_dir", new("p2"), "--tokenizer",
                                 char_tok, "--split", "chars"], "no text found", untouched=[char_tok]),
        Case("prepare_over_prepared_data", ["prepare", "--input", str(bad_text), "--out_dir", char_data,
                                            "--tokenizer", "char"], "already holds prepared data"),
        Case("prepare_bad_val_fraction", ["prepare", "--input", str(bad_text), "--out_dir", new("p3"),
                                          "--tokenizer", "char", "--val_fraction", "0"],
             "val_fraction=0.0 must be between 0 and 1", absent=[new("p3")]),
    ]
    by_id = {c.id: c for c in cases}
    assert len(by_id) == len(cases)
    before = snapshot(good_run, char_data)

    def run_case(c: Case):
        own = snapshot(*c.untouched)
        p = run_cli(*c.argv, env=ENV, timeout=240)
        return p, own, snapshot(*c.untouched)

    with ThreadPoolExecutor(WORKERS) as pool:
        results = dict(zip(by_id, pool.map(run_case, cases)))
    return World(good_run, char_data, by_id, results, before, snapshot(good_run, char_data))


CASE_IDS = [
    "missing_data_dir", "empty_data_dir", "empty_token_file", "truncated_token_file", "odd_length_token_file",
    "meta_count_mismatch", "meta_invalid_json", "meta_missing_keys", "missing_val_file", "corrupt_tokenizer",
    "vocab_mismatch", "block_size_above_n_positions", "init_from_no_config", "init_from_no_weights",
    "init_from_pickle_only", "init_from_not_gpt2", "unknown_recipe", "missing_recipe_file", "unknown_recipe_key",
    "recipe_invalid_yaml", "recipe_wrong_type", "unknown_flag", "int_given_text", "float_given_text",
    "bool_given_text", "bad_choice", "micro_batch_zero", "learning_rate_negative", "block_size_zero",
    "max_steps_negative", "no_stopping_point", "host_sync_log_with_8bit", "muon_learning_rate_zero", "muon_flag_with_8bit_adamw",
    "muon_momentum_out_of_range", "bias_false_with_init_from", "out_dir_holds_a_run", "resume_and_overwrite",
    "resume_changed_model_shape", "resume_missing_path", "resume_truncated_safetensors",
    "resume_path_without_manifest", "token_id_past_vocab", "meta_vocab_too_small", "val_split_too_short",
    "learning_rate_nan", "max_steps_inf", "seed_negative", "seed_too_large", "out_dir_is_a_file",
    "tracker_not_installed", "hellaswag_ending_longer_than_model", "init_from_truncated_weights",
    "init_from_config_mismatch",
    "resume_zeroed_optimizer_same_size", "eval_damaged_final", "sample_damaged_final", "prepare_missing_input", "prepare_no_text", "prepare_over_prepared_data",
    "prepare_bad_val_fraction",
]


def test_case_list_is_complete(world):
    assert sorted(CASE_IDS) == sorted(world.cases)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_bad_input_fails_clearly_and_changes_nothing(world, case_id):
    case = world.cases[case_id]
    p, own_before, own_after = world.results[case_id]
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2, (case.argv, p.returncode, p.stderr[-2000:])
    assert lines and lines[0].startswith("error: "), p.stderr[-2000:]
    assert case.fragment in lines[0], (case.fragment, lines[0])
    assert "Traceback" not in p.stderr, p.stderr[-2000:]
    assert own_after == own_before, f"{case_id} changed the files it was pointed at"
    for path in case.absent:
        assert not Path(path).exists(), f"{case_id} created {path} although it failed"
    # the finished run and the prepared data are byte-identical after every case
    assert world.after == world.before


def test_good_run_still_resumes_after_all_bad_inputs(world, tmp_path):
    """The good run is not just byte-identical but usable: it continues from its last checkpoint."""
    run = tmp_path / "run"
    shutil.copytree(world.good_run, run)
    p = run_cli("train", *tiny_flags(world.data, run, max_steps=6, checkpoint_interval=2, resume="auto"), env=ENV)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "resuming from" in p.stdout and "step_00000004 at step 4" in p.stdout


def test_prepare_replaces_non_utf8_bytes_and_counts_them(tmp_path):
    """Not an error: undecodable bytes become U+FFFD, and meta.json counts the documents that had them."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"plain ascii text, nothing odd here\n" * 20)
    (src / "b.txt").write_bytes(b"latin-1 caf\xe9 and a stray \xff byte\n" * 20)
    (src / "c.txt").write_bytes(b"cut utf-8 \xe2\x82 sequence\n" * 20)
    out = tmp_path / "out"
    p = run_cli("prepare", "--input", src, "--out_dir", out, "--tokenizer", "char", "--split", "chars",
                "--val_fraction", "0.2", env=ENV)
    assert p.returncode == 0, p.stderr
    meta = json.loads((out / "meta.json").read_text())
    assert meta["source"]["documents_with_replaced_bytes"] == 2
    assert "non-UTF-8" in p.stdout  # the summary line tells the user, too
    vocab = json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    assert "\ufffd" in vocab and "é" not in vocab
