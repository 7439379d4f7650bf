"""gpt2fit.evaluate: perplexity and HellaSwag against straightforward reference computations.

Everything runs offline on a tiny randomly initialized GPT-2 and a byte-level BPE trained here.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from conftest import read_rows, run_cli, tiny_flags
from gpt2fit import cli
from gpt2fit.evaluate import hellaswag as hs
from gpt2fit.evaluate import model as em
from gpt2fit.evaluate import perplexity as px
from gpt2fit.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).with_name("fixtures") / "hellaswag_tiny.jsonl"
N_POSITIONS = 64
N_TOKENS = 1000  # (1000 - 1) % 64 = 39: a partial last window; 15 full windows: a partial last batch at bs 7

CORPUS = [
    "A man is sitting on a roof. He starts pulling up roofing on a roof.",
    "A woman is standing in a kitchen with a bowl of dough. She rolls the dough into balls.",
    "The runners wait at the start line. A starter fires a pistol and they set off.",
    "[header] How to water a plant [title] Check the soil. [step] Push a finger into the soil.",
    "He tunes the strings of the guitar and begins to play a song for the crowd.",
    "Then, the man continues removing the snow on his car while a woman smiles.",
]


# ------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------


def _train_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    texts = CORPUS + [r["ctx"] for r in rows] + [" " + e for r in rows for e in r["endings"]]
    tok.train_from_iterator(texts * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _train_tokenizer()
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        n_positions=N_POSITIONS,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.3,  # peaked predictions, so scores differ clearly between endings
    )
    model = GPT2LMHeadModel(cfg)
    d = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def loaded(model_dir):
    model, tok = em.load_model_and_tokenizer(model_dir, device="cpu")
    return model, tok


def _write_data_dir(d: Path, tokens: np.ndarray, dtype: str = "uint16", vocab: int = 400) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    np.asarray(tokens, dtype=dtype).tofile(d / "val.bin")
    np.asarray(tokens[:200], dtype=dtype).tofile(d / "train.bin")
    meta = {
        "tokenizer": {"name_or_path": "tiny", "vocab_size": vocab, "eot_id": 0, "kind": "bpe"},
        "dtype": dtype,
        "splits": {"train": {"tokens": 200, "documents": 1}, "val": {"tokens": len(tokens), "documents": 1}},
        "source": {"kind": "test"},
    }
    (d / "meta.json").write_text(json.dumps(meta))
    return d


@pytest.fixture(scope="module")
def tokens(loaded):
    vocab = loaded[0].config.vocab_size
    return np.random.default_rng(0).integers(0, vocab, size=N_TOKENS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tokens, loaded):
    return _write_data_dir(tmp_path_factory.mktemp("data"), tokens, vocab=loaded[0].config.vocab_size)


# ------------------------------------------------------------------------------------------
# independent references
# ------------------------------------------------------------------------------------------


def reference_loss(model, tokens, block_size, window_indices=None):
    """Mean loss over predicted tokens: one window at a time, float64 log-softmax, a plain loop."""
    starts = list(range(0, len(tokens) - 1, block_size))
    if window_indices is not None:
        starts = [starts[i] for i in window_indices]
    total, count = 0.0, 0
    with torch.no_grad():
        for s in starts:
            w = torch.tensor(np.asarray(tokens[s : s + block_size + 1], dtype=np.int64))
            logp = torch.log_softmax(model(input_ids=w[None, :-1]).logits[0].double(), dim=-1)
            total -= sum(logp[i, t].item() for i, t in enumerate(w[1:].tolist()))
            count += len(w) - 1
    return total / count, count


def reference_hellaswag(model, tok, example, max_len=N_POSITIONS):
    """Per ending: (sum of log-probs of its tokens, token count), one ending per forward, the pair
    encoded whole and cut to its last max_len + 1 tokens (lm-eval's HFLM)."""
    out = []
    with torch.no_grad():
        for e in example["endings"]:
            ctx = tok.encode(example["ctx"])
            cont = tok.encode(example["ctx"] + " " + e)[len(ctx):]
            ids = (ctx + cont)[-(max_len + 1):]
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
            s = sum(logp[len(ids) - 1 - len(cont) + i, t].item() for i, t in enumerate(cont))
            out.append((s, len(cont)))
    return out


# ------------------------------------------------------------------------------------------
# perplexity
# ------------------------------------------------------------------------------------------


def test_perplexity_matches_direct_loss(loaded, data_dir, tokens):
    model, _ = loaded
    r = px.evaluate_perplexity(model, data_dir, batch_size=7)
    ref, count = reference_loss(model, tokens, N_POSITIONS)
    assert r["tokens"] == count == N_TOKENS - 1
    assert r["windows"] == math.ceil((N_TOKENS - 1) / N_POSITIONS) == 16
    assert r["loss"] == pytest.approx(ref, rel=1e-5)
    assert r["ppl"] == pytest.approx(math.exp(ref), rel=1e-5)
    # A random model is near-uniform: the loss is about log(vocab), nowhere near 0.
    assert r["loss"] > 0.5 * math.log(model.config.vocab_size)


def test_perplexity_batch_size_and_block_size(loaded, data_dir, tokens):
    model, _ = loaded
    a = px.evaluate_perplexity(model, data_dir, batch_size=1)
    b = px.evaluate_perplexity(model, data_dir, batch_size=7)
    assert a["tokens"] == b["tokens"] and a["windows"] == b["windows"]
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    c = px.evaluate_perplexity(model, data_dir, batch_size=4, block_size=24)
    ref, count = reference_loss(model, tokens, 24)
    assert c["tokens"] == count == N_TOKENS - 1
    assert c["windows"] == math.ceil((N_TOKENS - 1) / 24)
    assert c["loss"] == pytest.approx(ref, rel=1e-5)
    with pytest.raises(UserError, match="n_positions"):
        px.evaluate_perplexity(model, data_dir, block_size=N_POSITIONS + 1)


def test_perplexity_max_windows_is_deterministic_and_evenly_spaced(loaded, data_dir, tokens):
    model, _ = loaded
    r1 = px.evaluate_perplexity(model, data_dir, max_windows=5, batch_size=3)
    r2 = px.evaluate_perplexity(model, data_dir, max_windows=5, batch_size=2)
    assert r1["windows"] == 5
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6)
    idx = [0, 4, 8, 11, 15]  # round(linspace(0, 15, 5)): first and (partial) last window included
    assert list(px.window_starts(N_TOKENS, N_POSITIONS, 5)) == [i * N_POSITIONS for i in idx]
    ref, count = reference_loss(model, tokens, N_POSITIONS, idx)
    assert r1["tokens"] == count == 4 * N_POSITIONS + 39
    assert r1["loss"] == pytest.approx(ref, rel=1e-5)
    # more windows than exist: all of them
    assert px.evaluate_perplexity(model, data_dir, max_windows=1000)["windows"] == 16


def test_window_rule():
    # ceil((1000 - 1) / 64) = 16 windows sharing boundary tokens; the last holds 39 + 1 tokens
    assert list(px.window_starts(N_TOKENS, N_POSITIONS)) == [i * N_POSITIONS for i in range(16)]
    for all_of_them in (None, 0, 16, 1000):
        assert len(px.window_starts(N_TOKENS, N_POSITIONS, all_of_them)) == 16
    assert list(px.window_starts(N_TOKENS, N_POSITIONS, 1)) == [0]
    assert list(px.window_starts(65, 64)) == [0] and list(px.window_starts(66, 64)) == [0, 64]
    assert len(px.window_starts(1, 64)) == 0


def test_windowed_loss_same_shapes_exact_and_modes_restored(loaded, tokens):
    model, _ = loaded
    ref, count = reference_loss(model, tokens, N_POSITIONS)
    shapes = []
    loss_fn = px.HFLossSum(model)

    def spy(x, y):
        shapes.append((tuple(x.shape), tuple(y.shape)))
        return loss_fn(x, y)

    r = px.windowed_loss(spy, tokens, N_POSITIONS, batch_size=7)
    # 16 windows at 7 per batch: 3 batches, all [7, 64]; the short window and batch are padded
    assert shapes == [((7, N_POSITIONS), (7, N_POSITIONS))] * 3
    assert r["tokens"] == count and r["windows"] == 16
    assert r["loss"] == pytest.approx(ref, rel=1e-5)
    # a module runs in eval mode (dropout off), and each submodule gets its own mode back
    model.train()
    model.transformer.h[0].eval()
    flags = [m.training for m in model.modules()]
    try:
        r2 = px.windowed_loss(loss_fn, tokens, N_POSITIONS, batch_size=4)
        assert [m.training for m in model.modules()] == flags
    finally:
        model.eval()
    assert r2["loss"] == pytest.approx(ref, rel=1e-5) and r2["tokens"] == count
    with pytest.raises(UserError, match="at least 2"):
        px.windowed_loss(loss_fn, tokens[:1], N_POSITIONS, batch_size=4)


def test_perplexity_uint32_and_train_split(loaded, tmp_path, tokens):
    model, _ = loaded
    d16 = _write_data_dir(tmp_path / "d16", tokens, "uint16")
    d32 = _write_data_dir(tmp_path / "d32", tokens, "uint32")
    a = px.evaluate_perplexity(model, d16)
    b = px.evaluate_perplexity(model, d32)
    assert a == b
    t = px.evaluate_perplexity(model, d16, split="train")
    assert t["tokens"] == 199


def test_perplexity_restores_training_mode(loaded, data_dir):
    model, _ = loaded
    ref = px.evaluate_perplexity(model, data_dir)["loss"]
    model.train()  # dropout on: a scorer that forgot eval() would get a different loss
    try:
        r = px.evaluate_perplexity(model, data_dir)
        assert model.training
    finally:
        model.eval()
    assert r["loss"] == pytest.approx(ref, rel=1e-6)


def test_perplexity_vocab_too_small(loaded, tmp_path, tokens):
    model, _ = loaded
    vocab = model.config.vocab_size
    bad = tokens.copy()
    bad[500] = vocab + 5
    d = _write_data_dir(tmp_path / "bad", bad, vocab=vocab + 10)
    with pytest.raises(UserError) as e:
        px.evaluate_perplexity(model, d)
    assert str(vocab + 5) in str(e.value) and str(vocab) in str(e.value)


def test_data_dir_errors(loaded, tmp_path, tokens):
    model, _ = loaded
    with pytest.raises(UserError, match="gpt2fit prepare") as e:
        px.evaluate_perplexity(model, tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value).splitlines()[0]
    (tmp_path / "nometa").mkdir()
    with pytest.raises(UserError, match="meta.json"):
        px.evaluate_perplexity(model, tmp_path / "nometa")
    d = _write_data_dir(tmp_path / "nobin", tokens)
    (d / "val.bin").unlink()
    with pytest.raises(UserError, match="val.bin"):
        px.evaluate_perplexity(model, d)


# ------------------------------------------------------------------------------------------
# HellaSwag
# ------------------------------------------------------------------------------------------


def test_load_hellaswag_original_schema():
    raw = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    assert {"ind", "activity_label", "ctx_a", "ctx_b", "split", "source_id"} <= set(raw[0])
    plain = hs.load_hellaswag(FIXTURE, text="raw")
    assert len(plain) == len(raw) == 6
    for e, r in zip(plain, raw):
        assert (e["ctx"], e["endings"], e["label"]) == (r["ctx"], r["endings"], r["label"])
        assert e["where"].startswith(f"{FIXTURE}:")
    ex = hs.load_hellaswag(FIXTURE)  # lm-eval's text: "activity_label: ctx_a Ctx_b", brackets removed
    assert ex[0]["ctx"] == ("Removing ice from car: Then, the man writes over the snow covering the window of a car, "
                            "and a woman wearing winter clothes smiles. Then")
    wikihow = next(e for e, r in zip(ex, raw) if "[" in r["ctx"])
    assert "[" not in wikihow["ctx"] and not any("[" in x for x in wikihow["endings"])
    assert [e["label"] for e in ex] == [r["label"] for r in raw]


def test_load_hellaswag_hub_schema_via_datasets(tmp_path):
    # The Hub dataset (Rowan/hellaswag) has label as a string; load a local copy through the
    # same datasets.load_dataset(..., split="validation") path.
    d = tmp_path / "hellaswag_hub"
    d.mkdir()
    with open(d / "validation.jsonl", "w") as f:
        for line in FIXTURE.read_text().splitlines():
            row = json.loads(line)
            row["label"] = str(row["label"])
            f.write(json.dumps(row) + "\n")
    strip = lambda exs: [{k: v for k, v in e.items() if k != "where"} for e in exs]  # noqa: E731
    assert strip(hs.load_hellaswag(str(d))) == strip(hs.load_hellaswag(FIXTURE))


def test_load_hellaswag_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        hs.load_hellaswag(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"ctx": "a", "endings": ["b", "c"], "label": 0}) + "\n")
    with pytest.raises(UserError, match="4 string endings"):
        hs.load_hellaswag(bad, text="raw")
    # lm-eval's text needs activity_label, ctx_a, ctx_b: the error names the line and the fields
    row = json.loads(FIXTURE.read_text().splitlines()[0])
    del row["ctx_b"]
    bad.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError) as e:
        hs.load_hellaswag(bad)
    assert str(e.value).startswith(f"{bad}:1: HellaSwag example without ctx_b")
    assert hs.load_hellaswag(bad, text="raw")[0]["ctx"] == row["ctx"]  # raw text reads ctx only


def test_an_ending_longer_than_the_model_is_an_error_naming_the_example(loaded, tmp_path):
    model, tok = loaded
    row = json.loads(FIXTURE.read_text().splitlines()[1])
    row["endings"][2] = " ".join(["dough"] * 3 * N_POSITIONS)
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps(row) + "\n")
    with pytest.raises(UserError) as e:
        hs.score_hellaswag(model, tok, hs.load_hellaswag(f))
    assert str(e.value).startswith(f"HellaSwag {f}:1: ending 2 is ") and f"{N_POSITIONS} positions" in str(e.value)


def test_hellaswag_subset_is_deterministic():
    ex = hs.load_hellaswag(FIXTURE)
    a = hs.hellaswag_subset(ex, 3, seed=1)
    assert a == hs.hellaswag_subset(ex, 3, seed=1)
    assert len(a) == 3
    pos = [ex.index(x) for x in a]
    assert pos == sorted(pos)
    assert hs.hellaswag_subset(ex, 100, seed=1) == ex


@pytest.mark.parametrize("text", hs.TEXTS)
def test_score_hellaswag_matches_per_ending_reference(loaded, text):
    model, tok = loaded
    examples = hs.load_hellaswag(FIXTURE, text=text)
    # The WikiHow example does not fit 64 positions: each pair is cut to its last 65 tokens
    rows = hs.encode_example(tok, examples[3], N_POSITIONS)
    assert len(tok.encode(examples[3]["ctx"])) + max(n for _, n in rows) > N_POSITIONS + 1
    assert [len(r) for r, _ in rows] == [N_POSITIONS + 1] * 4

    refs = [reference_hellaswag(model, tok, e) for e in examples]
    model.train()  # dropout on: the scorer must switch to eval and back
    try:
        r = hs.score_hellaswag(model, tok, examples, batch_size=4, return_details=True)
        assert model.training
    finally:
        model.eval()

    want = {"pred": [], "pred_norm": [], "pred_norm_token": []}
    for ex, ref, det in zip(examples, refs, r["details"]):
        sums = [s for s, _ in ref]
        assert det["logprob_sum"] == pytest.approx(sums, abs=1e-3)
        assert det["n_tokens"] == [n for _, n in ref]
        want["pred"].append(int(np.argmax(sums)))
        want["pred_norm"].append(int(np.argmax([s / len(e) for s, e in zip(sums, ex["endings"])])))
        want["pred_norm_token"].append(int(np.argmax([s / n for s, n in ref])))
    for key, preds in want.items():
        assert [d[key] for d in r["details"]] == preds
    labels = [e["label"] for e in examples]
    assert r["n"] == 6
    assert r["acc"] == pytest.approx(np.mean([p == y for p, y in zip(want["pred"], labels)]))
    assert r["acc_norm"] == pytest.approx(np.mean([p == y for p, y in zip(want["pred_norm"], labels)]))
    assert r["acc_norm_token"] == pytest.approx(np.mean([p == y for p, y in zip(want["pred_norm_token"], labels)]))

    # batch size does not change the answer
    r1 = hs.score_hellaswag(model, tok, examples, batch_size=1, return_details=True)
    for a, b in zip(r1["details"], r["details"]):
        assert a["logprob_sum"] == pytest.approx(b["logprob_sum"], abs=1e-4)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path, model_dir, data_dir):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "final")
    (run / "config.yaml").write_text(f"data_dir: {data_dir}\nrecipe: tiny\n")
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1, "tokens": 64, "loss": 6.0}) + "\n")
    return run


def test_cli_eval_run_dir_writes_and_merges(run_dir, data_dir, loaded, capsys):
    model, tok = loaded
    rc = cli.main(["eval", str(run_dir), "--data_dir", str(data_dir), "--batch_size", "5"])
    assert rc == 0
    res = json.loads((run_dir / "eval_results.json").read_text())
    assert "hellaswag" not in res
    rc = cli.main(["eval", str(run_dir), "--hellaswag", str(FIXTURE), "--hellaswag_limit", "5"])
    assert rc == 0
    res = json.loads((run_dir / "eval_results.json").read_text())
    assert res["model"] == str(run_dir)
    ppl, hsr = res["perplexity"], res["hellaswag"]
    direct = px.evaluate_perplexity(model, data_dir)
    assert ppl["split"] == "val" and ppl["block_size"] == N_POSITIONS
    assert ppl["tokens"] == direct["tokens"] and ppl["windows"] == direct["windows"]
    assert ppl["loss"] == pytest.approx(direct["loss"], rel=1e-5)
    assert ppl["ppl"] == pytest.approx(math.exp(ppl["loss"]), rel=1e-9)
    direct_hs = hs.score_hellaswag(model, tok, hs.load_hellaswag(FIXTURE)[:5])
    assert hsr["n"] == 5 and hsr["source"] == str(FIXTURE) and hsr["text"] == "lm_eval"
    for k in ("acc", "acc_norm", "acc_norm_token"):
        assert hsr[k] == pytest.approx(direct_hs[k])
    out = capsys.readouterr().out
    assert "acc_norm" in out and "wrote" in out


def test_cli_eval_defaults_to_the_runs_data_dir(run_dir, capsys):
    assert cli.main(["eval", str(run_dir), "--max_windows", "2"]) == 0
    res = json.loads((run_dir / "eval_results.json").read_text())
    assert res["perplexity"]["windows"] == 2
    assert "data_dir" in capsys.readouterr().out


def test_cli_eval_model_dir_prints_only(model_dir, data_dir, tmp_path, capsys):
    assert cli.main(["eval", str(model_dir), "--data_dir", str(data_dir), "--max_windows", "3"]) == 0
    assert not (Path(model_dir) / "eval_results.json").exists()
    assert "ppl" in capsys.readouterr().out
    out = tmp_path / "sub" / "res.json"
    assert cli.main(["eval", str(model_dir), "--hellaswag", str(FIXTURE), "--output", str(out)]) == 0
    assert json.loads(out.read_text())["hellaswag"]["n"] == 6


@pytest.mark.parametrize(
    "args, needle",
    [
        (["/nonexistent/run_dir", "--data_dir", "{data}"], "/nonexistent/run_dir"),
        (["{model}", "--data_dir", "/nonexistent/data"], "/nonexistent/data"),
        (["{model}", "--data_dir", "{tmp}"], "meta.json"),
        (["{model}", "--data_dir", "{data}", "--split", "test"], "test.bin"),
        (["{model}", "--hellaswag", "/nonexistent/hs.jsonl"], "/nonexistent/hs.jsonl"),
        (["{model}"], "nothing to evaluate"),
    ],
)
def test_cli_eval_bad_paths_exit_2(args, needle, model_dir, data_dir, tmp_path, capsys):
    args = [a.format(model=model_dir, data=data_dir, tmp=tmp_path) for a in args]
    assert cli.main(["eval", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert needle in err.splitlines()[0]


def test_cli_eval_run_dir_without_final(tmp_path, capsys):
    run = tmp_path / "unfinished"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert cli.main(["eval", str(run), "--data_dir", str(tmp_path)]) == 2
    assert "final/" in capsys.readouterr().err.splitlines()[0]


@pytest.mark.parametrize("command, args, needle", [
    ("eval", ["--batch_size", "0"], "batch_size"),
    ("eval", ["--max_windows", "nan"], "max_windows"),
    ("eval", ["--device", "foo"], "--device"),
    ("eval", ["--device", "cuda:7"], "--device"),
    ("eval", ["--dtype", "float8"], "dtype"),
    ("eval", ["--block_size", "-1"], "block_size"),
    ("sample", ["--top_k", "-5"], "top_k"),
    ("sample", ["--temperature", "-1"], "temperature"),
    ("sample", ["--temperature", "nan"], "temperature"),
    ("sample", ["--top_p", "0"], "top_p"),
    ("sample", ["--top_p", "1.5"], "top_p"),
    ("sample", ["--max_new_tokens", "0"], "max_new_tokens"),
    ("sample", ["--num_samples", "0"], "num_samples"),
    ("sample", ["--device", "foo"], "--device"),
])
def test_cli_bad_flags_exit_2(command, args, needle, model_dir, data_dir, capsys):
    data = ["--data_dir", str(data_dir)] if command == "eval" else []
    assert cli.main([command, str(model_dir), *data, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err.splitlines()[0]


def test_cli_sample_greedy_and_seeded(model_dir, capsys):
    flags = ["--prompt", "A man is", "--max_new_tokens", "6", "--device", "cpu"]
    outs = []
    for extra in (["--temperature", "0", "--seed", "1"], ["--temperature", "0", "--seed", "2"],
                  ["--seed", "3", "--num_samples", "2"], ["--seed", "3", "--num_samples", "2"]):
        assert cli.main(["sample", str(model_dir), *flags, *extra]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] and outs[0].startswith("A man is")  # greedy: the seed does not matter
    assert outs[2] == outs[3] and outs[2].count("--- sample") == 2


def test_eval_gives_the_training_logs_val_loss(char_data, tmp_path):
    """The same estimator in the training loop and in `gpt2fit eval`: for the final weights and the
    same windows (eval_batches * micro_batch of them), metrics.jsonl and eval_results.json agree."""
    run = tmp_path / "run"
    p = run_cli("train", *tiny_flags(char_data, run))
    assert p.returncode == 0, p.stderr[-3000:]
    last = read_rows(run, "eval")[-1]
    assert last["step"] == 20  # the final weights, exported to final/
    p = run_cli("eval", run, "--data_dir", char_data, "--max_windows", 4 * 4, "--batch_size", 4,
                "--block_size", 32, "--dtype", "float32", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((run / "eval_results.json").read_text())["perplexity"]
    assert res["windows"] == 16
    assert res["loss"] == pytest.approx(last["val_loss"], rel=1e-5, abs=1e-6)
    # final/ loads in transformers 4.x too: a class 4.x knows (not 5.x's TokenizersBackend), and a
    # model_max_length the model can take; generation config as stock GPT-2's (greedy unless asked)
    tok_config = json.loads((run / "final" / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast" and tok_config["model_max_length"] == 32
    assert "local_files_only" not in tok_config
    gen = json.loads((run / "final" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == gen["eos_token_id"] == json.loads((run / "final" / "config.json").read_text())[
        "eos_token_id"] and "do_sample" not in gen


# ------------------------------------------------------------------------------------------
# two processes (gloo on CPU)
# ------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_answer(loaded, model_dir, data_dir, tmp_path):
    model, tok = loaded
    out = tmp_path / "two_proc.json"
    env = dict(os.environ, ACCELERATE_USE_CPU="true", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        str(ROOT / "scripts" / "eval.py"), str(model_dir),
        "--data_dir", str(data_dir), "--batch_size", "3",
        "--hellaswag", str(FIXTURE), "--output", str(out),
    ]  # fmt: skip
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "evaluating on 2 processes (cpu)" in p.stdout
    assert p.stdout.count("perplexity ") == 1  # only the main process prints
    res = json.loads(out.read_text())
    one = px.evaluate_perplexity(model, data_dir, batch_size=3)
    assert res["perplexity"]["tokens"] == one["tokens"] == N_TOKENS - 1
    assert res["perplexity"]["windows"] == one["windows"]
    assert res["perplexity"]["loss"] == pytest.approx(one["loss"], rel=1e-5)
    ref = hs.score_hellaswag(model, tok, hs.load_hellaswag(FIXTURE))
    assert res["hellaswag"]["n"] == 6
    for k in ("acc", "acc_norm", "acc_norm_token"):
        assert res["hellaswag"][k] == pytest.approx(ref[k])


# ------------------------------------------------------------------------------------------
# lm-evaluation-harness (the eval extra): a local hellaswag-format task, offline
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_eval_task(tmp_path_factory):
    """A task dir with `hellaswag_tiny`: lm-eval's own hellaswag.yaml (its preprocessing and
    metrics, included) over 24 local items: the fixture's 6, each with its endings rotated 4 ways."""
    lm_eval = pytest.importorskip("lm_eval")
    d = tmp_path_factory.mktemp("lm_eval_tasks")
    rows = []
    for line in FIXTURE.read_text().splitlines():
        row = json.loads(line)
        for k in range(4):
            rows.append({**row, "ind": len(rows), "endings": row["endings"][k:] + row["endings"][:k],
                         "label": str((row["label"] - k) % 4)})
    (d / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "hellaswag_tiny.yaml").write_text(
        f"include: {Path(lm_eval.__file__).parent / 'tasks' / 'hellaswag' / 'hellaswag.yaml'}\n"
        f"task: hellaswag_tiny\ndataset_path: json\ndataset_name: null\ntraining_split: null\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {d / 'items.jsonl'}\n")
    return d


def test_builtin_hellaswag_agrees_with_lm_eval_item_by_item(loaded, lm_eval_task):
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = loaded
    out = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=4), tasks=["hellaswag_tiny"],
                                  task_manager=TaskManager(include_path=str(lm_eval_task)), log_samples=True)
    theirs = sorted(out["samples"]["hellaswag_tiny"], key=lambda s: s["doc_id"])
    ours = hs.score_hellaswag(model, tok, hs.load_hellaswag(lm_eval_task / "items.jsonl"), batch_size=5,
                              return_details=True)
    assert len(theirs) == ours["n"] == 24
    for t, o in zip(theirs, ours["details"]):
        assert o["logprob_sum"] == pytest.approx([r[0] for r in t["filtered_resps"]], abs=1e-3)
        assert (float(o["pred"] == o["label"]), float(o["pred_norm"] == o["label"])) == (t["acc"], t["acc_norm"])
    res = out["results"]["hellaswag_tiny"]
    assert (ours["acc"], ours["acc_norm"]) == pytest.approx((res["acc,none"], res["acc_norm,none"]))
    assert 0 < ours["acc_norm"] < 1  # the rotations make a mix of right and wrong picks
    # the raw text (llm.c's) is a different measurement: it picks otherwise on some items here
    raw = hs.score_hellaswag(model, tok, hs.load_hellaswag(lm_eval_task / "items.jsonl", text="raw"),
                             return_details=True)
    assert [d["pred_norm"] for d in raw["details"]] != [d["pred_norm"] for d in ours["details"]]


def test_cli_eval_tasks_writes_versions_and_nshot(run_dir, lm_eval_task, loaded, capsys):
    model, tok = loaded
    args = ["eval", str(run_dir), "--include_path", str(lm_eval_task), "--batch_size", "4"]
    assert cli.main([*args, "--hellaswag", str(lm_eval_task / "items.jsonl")]) == 0
    assert cli.main([*args, "--tasks", "hellaswag_tiny"]) == 0
    res = json.loads((run_dir / "eval_results.json").read_text())
    task = res["lm_eval"]["hellaswag_tiny"]
    assert task["version"] == 1.0 and task["num_fewshot"] == 0 and task["samples"] == 24 and task["limit"] is None
    assert task["dataset"] == "json" and task["lm_eval_version"]
    assert set(task["metrics"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert task["metrics"]["acc_norm"] == pytest.approx(res["hellaswag"]["acc_norm"])  # the run before: kept
    assert "lm-eval hellaswag_tiny (version 1.0, 0-shot, 24 examples)" in capsys.readouterr().out
    # a second run of other tasks adds to them; --limit and --num_fewshot reach lm-eval
    assert cli.main([*args, "--tasks", f"{lm_eval_task / 'hellaswag_tiny.yaml'}", "--limit", "3"]) == 0
    res = json.loads((run_dir / "eval_results.json").read_text())["lm_eval"]
    assert res["hellaswag_tiny"]["samples"] == 3 and res["hellaswag_tiny"]["limit"] == 3


def test_cli_eval_tasks_bad_input(run_dir, lm_eval_task, monkeypatch, capsys):
    def first_error(*args):
        assert cli.main(["eval", str(run_dir), *args]) == 2
        return capsys.readouterr().err.splitlines()[0]

    err = first_error("--tasks", "hellaswag_tinny", "--include_path", str(lm_eval_task))
    assert err.startswith("error: unknown lm-eval task 'hellaswag_tinny'. Did you mean 'hellaswag_tiny'")
    assert "--include_path" in first_error("--tasks", "x", "--include_path", str(run_dir / "nope"))
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # as without lm_eval installed
    assert "pip install 'gpt2fit[eval]'" in first_error("--tasks", "hellaswag")
    assert not (run_dir / "eval_results.json").exists()
