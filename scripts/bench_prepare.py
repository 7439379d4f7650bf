"""Benchmark `gpt2fit prepare` against nanoGPT's data/openwebtext/prepare.py approach, side by side.

    python scripts/bench_prepare.py --size_mb 100 --repeat 2 --out benchmarks/prepare/cpu_100mb.json
    python scripts/bench_prepare.py --size_mb 2048 --out benchmarks/prepare/cpu_2gb.json

Both tokenize the same generated jsonl corpus (Tiny Shakespeare passages + Python stdlib sources,
shuffled into documents, written to a temp dir and deleted afterwards) with GPT-2's BPE and write
uint16 train.bin / val.bin (val = 0.05% of documents, nanoGPT's test_size):

  (a) gpt2fit: `python -m gpt2fit.cli prepare --input corpus.jsonl --tokenizer <gpt2 dir> --workers N`
  (b) nanoGPT: datasets.load_dataset("json") -> train_test_split(0.0005, seed 2357) -> .map(num_proc=N)
      calling tiktoken's encode_ordinary + EOT -> np.memmap written in 1024 batches (the same code as
      nanoGPT's prepare.py). No network here, so its tiktoken "gpt2" Encoding is built the way
      tiktoken's own openai_public.gpt2() builds it, from the local merges.txt (checked against
      OpenAI's vocab.bpe sha256) and vocab.json.

Each runs in its own subprocess; wall time, CPU time (of the subprocess tree) and the peak RSS
summed over the subprocess and all its children (sampled every 0.2 s) are recorded, with the peak
PSS and the peak anonymous RSS (RSS minus file-backed pages: nanoGPT's memory-mapped Arrow cache and
np.memmap output count in RSS). `other_processes_cpu_s` is the CPU time the rest of the machine used
during the run: on a shared machine, tokens per CPU-second is the steadier comparison. The check
that both produced identical ids compares every document's token sequence (as a multiset: the two
split documents between train and val differently).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GPT2_DIR = ROOT.parent / "shared" / "gpt2-tokenizer"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
OPENAI_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
EOT = 50256


# ------------------------------------------------------------------------------------------
# corpus
# ------------------------------------------------------------------------------------------
def make_corpus(path: Path, size_bytes: int, seed: int = 0) -> dict:
    """jsonl of ~1-8 KB documents: Shakespeare passages and stdlib code, shuffled, until size_bytes."""
    sys.path.insert(0, str(ROOT / "src"))
    from gpt2fit.prepare.sources import stdlib_files

    rng = random.Random(seed)
    paras = [p for p in SHAKESPEARE.read_text().split("\n\n") if p.strip()]
    pieces: list[str] = []
    i = 0
    while i < len(paras):  # passages of 5-40 speeches
        n = rng.randint(5, 40)
        pieces.append("\n\n".join(paras[i:i + n]))
        i += n
    for f in stdlib_files():
        text = f.read_text(errors="replace")
        blocks = text.split("\n\n\n")  # top-level definitions, grouped into 1-8 KB documents
        cur = ""
        for b in blocks:
            cur = f"{cur}\n\n\n{b}" if cur else b
            if len(cur) > rng.randint(1000, 8000):
                pieces.append(cur)
                cur = ""
        if cur.strip():
            pieces.append(cur)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < size_bytes:
            rng.shuffle(pieces)
            for p in pieces:
                line = json.dumps({"text": p, "id": docs}, ensure_ascii=False) + "\n"
                fh.write(line)
                written += len(line.encode("utf-8"))
                docs += 1
                if written >= size_bytes:
                    break
    return {"bytes": path.stat().st_size, "documents": docs, "unique_pieces": len(pieces),
            "format": "jsonl {text, id}", "content": "Tiny Shakespeare passages (5-40 speeches) and Python "
            "stdlib sources cut into 1-8 KB documents, shuffled and repeated to size (seed %d)" % seed}


# ------------------------------------------------------------------------------------------
# (b) nanoGPT's openwebtext/prepare.py, on a local jsonl
# ------------------------------------------------------------------------------------------
def nanogpt_encoding():
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    os.environ["TIKTOKEN_CACHE_DIR"] = ""  # read the local files, cache nothing
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=str(GPT2_DIR / "merges.txt"),
                                            encoder_json_file=str(GPT2_DIR / "vocab.json"),
                                            vocab_bpe_hash=OPENAI_VOCAB_BPE_SHA256)
    return tiktoken.Encoding(name="gpt2", explicit_n_vocab=50257, pat_str=r50k_pat_str,
                             mergeable_ranks=ranks, special_tokens={"<|endoftext|>": EOT})


def run_nanogpt(corpus: str, out_dir: str, num_proc: int, cache_dir: str) -> None:
    from datasets import load_dataset
    from tqdm import tqdm

    t = {"start": time.time()}
    enc = nanogpt_encoding()
    dataset = load_dataset("json", data_files=corpus, cache_dir=cache_dir)
    t["load_dataset"] = time.time()
    split_dataset = dataset["train"].train_test_split(test_size=0.0005, seed=2357, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")
    t["split"] = time.time()

    def process(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = split_dataset.map(process, remove_columns=["text"], desc="tokenizing the splits",
                                  num_proc=num_proc)
    t["map"] = time.time()
    for split, dset in tokenized.items():
        arr_len = np.sum(dset["len"], dtype=np.uint64)
        filename = os.path.join(out_dir, f"{split}.bin")
        arr = np.memmap(filename, dtype=np.uint16, mode="w+", shape=(arr_len,))
        total_batches = min(1024, len(dset))  # nanoGPT: 1024 (its val split has 4,007 documents)
        idx = 0
        for batch_idx in tqdm(range(total_batches), desc=f"writing {filename}", disable=True):
            batch = dset.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
            arr_batch = np.concatenate(batch["ids"])
            arr[idx: idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
    t["write"] = time.time()
    keys = list(t)
    print(json.dumps({"phases_s": {k: round(t[k] - t[p], 2) for p, k in zip(keys, keys[1:])}}))


# ------------------------------------------------------------------------------------------
# measuring a subprocess tree
# ------------------------------------------------------------------------------------------
def measure(cmd: list[str], env: dict | None = None) -> dict:
    import psutil

    cpu0 = psutil.cpu_times()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    root = psutil.Process(proc.pid)
    peak_rss = peak_pss = peak_anon = peak_procs = 0
    while proc.poll() is None:
        rss = pss = anon = 0
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in procs:
            try:
                mi = p.memory_full_info()
                rss += mi.rss
                pss += getattr(mi, "pss", mi.rss)
                anon += mi.rss - getattr(mi, "shared", 0)  # minus file-backed pages (mmapped files, page cache)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak_rss, peak_pss, peak_procs = max(peak_rss, rss), max(peak_pss, pss), max(peak_procs, len(procs))
        peak_anon = max(peak_anon, anon)
        time.sleep(0.2)
    out, err = proc.communicate()
    wall = time.time() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = psutil.cpu_times()
    busy = sum(getattr(cpu1, f) - getattr(cpu0, f) for f in ("user", "system", "nice", "irq", "softirq"))
    ours = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-4000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(ours, 1), "other_processes_cpu_s": round(max(busy - ours, 0), 1),
            "peak_rss_bytes": peak_rss, "peak_rss_gib": round(peak_rss / 2**30, 3),
            "peak_pss_bytes": peak_pss, "peak_pss_gib": round(peak_pss / 2**30, 3),
            "peak_rss_anon_gib": round(peak_anon / 2**30, 3), "max_processes": peak_procs,
            "stdout_tail": out.strip().splitlines()[-1:] if out.strip() else []}


def doc_multiset(out_dir: Path) -> tuple[int, collections.Counter]:
    """(tokens, Counter of per-document sha1) over train.bin + val.bin; documents end at EOT."""
    c: collections.Counter = collections.Counter()
    tokens = 0
    for split in ("train", "val"):
        arr = np.memmap(out_dir / f"{split}.bin", dtype=np.uint16, mode="r")
        tokens += len(arr)
        ends = np.flatnonzero(arr == EOT)
        start = 0
        for e in ends:
            c[hashlib.sha1(arr[start:e + 1].tobytes()).digest()] += 1
            start = e + 1
        assert start == len(arr), f"{out_dir}/{split}.bin does not end with EOT"
    return tokens, c


# ------------------------------------------------------------------------------------------
def versions() -> dict:
    import importlib.metadata as md

    v = {"python": platform.python_version()}
    for pkg in ("numpy", "tiktoken", "tokenizers", "datasets", "pyarrow", "transformers", "psutil"):
        try:
            v[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            v[pkg] = None
    try:
        v["gpt2fit_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                             text=True).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src/gpt2fit/prepare/", "src/gpt2fit/formats.py",
                                "scripts/bench_prepare.py"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        v["gpt2fit_uncommitted_changes"] = bool(dirty)  # prepare.py / data.py / this script differ from the commit
    except OSError:
        v["gpt2fit_commit"] = None
    return v


def device() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    import psutil

    return {"cpu": model, "logical_cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "os": platform.platform()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size_mb", type=float, default=100, help="Corpus size in MB (10^6 bytes) of jsonl.")
    p.add_argument("--repeat", type=int, default=1, help="Runs of each approach (alternating a, b, a, b, ...).")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                   help="Processes for both: gpt2fit --workers and nanoGPT's map(num_proc=...).")
    p.add_argument("--only", choices=("both", "gpt2fit", "nanogpt"), default="both", help="Which approaches to run.")
    p.add_argument("--tmp", default=None, help="Directory for the corpus and outputs (deleted afterwards).")
    p.add_argument("--out", required=True, help="JSON file to write the results to.")
    p.add_argument("--notes", default="", help="Free text stored in the JSON (e.g. contention).")
    p.add_argument("--_nanogpt", nargs=4, metavar=("CORPUS", "OUT", "NUM_PROC", "CACHE"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._nanogpt:
        corpus, out, n, cache = a._nanogpt
        run_nanogpt(corpus, out, int(n), cache)
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="bench_prepare_", dir=a.tmp))
    try:
        corpus = tmp / "corpus.jsonl"
        t = time.time()
        info = make_corpus(corpus, int(a.size_mb * 1e6))
        print(f"corpus: {info['bytes'] / 1e6:,.0f} MB, {info['documents']:,} documents ({time.time() - t:.0f}s)",
              flush=True)
        runs = {"gpt2fit": [], "nanogpt": []}
        sums: dict[str, tuple] = {}
        order = ["gpt2fit", "nanogpt"] if a.only == "both" else [a.only]
        for r in range(a.repeat):
            for name in order:
                out = tmp / f"{name}_{r}"
                out.mkdir()
                if name == "gpt2fit":
                    cmd = [sys.executable, "-m", "gpt2fit.cli", "prepare", "--input", str(corpus), "--tokenizer",
                           str(GPT2_DIR), "--out_dir", str(out), "--val_fraction", "0.0005",
                           "--workers", str(a.workers), "--quiet"]
                else:
                    cmd = [sys.executable, __file__, "--out", "-", "--_nanogpt", str(corpus), str(out),
                           str(a.workers), str(tmp / f"hf_cache_{r}")]
                m = measure(cmd, env={"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                                      "HF_DATASETS_DISABLE_PROGRESS_BARS": "1"})
                tokens, ms = doc_multiset(out)
                m["tokens"] = tokens
                m["tokens_per_s"] = round(tokens / m["wall_s"])
                m["mb_per_s"] = round(info["bytes"] / 1e6 / m["wall_s"], 2)
                if name == "nanogpt" and m["stdout_tail"]:
                    m.update(json.loads(m.pop("stdout_tail")[0]))
                else:
                    m.pop("stdout_tail", None)
                if name == "gpt2fit":
                    meta = json.loads((out / "meta.json").read_text())
                    m["encoder"] = meta["encoder"]
                runs[name].append(m)
                print(f"{name} run {r}: {m['wall_s']}s, {m['tokens_per_s']:,} tokens/s, peak RSS "
                      f"{m['peak_rss_gib']} GiB (PSS {m['peak_pss_gib']}, anonymous {m['peak_rss_anon_gib']}), "
                      f"CPU {m['cpu_s']}s, other processes' CPU "
                      f"{m['other_processes_cpu_s']}s", flush=True)
                key = (tokens, ms)
                sums.setdefault(name, key)
                shutil.rmtree(out)
                shutil.rmtree(tmp / f"hf_cache_{r}", ignore_errors=True)
        result = {
            "benchmark": "prepare: gpt2fit vs nanoGPT's openwebtext/prepare.py approach",
            "command": "python scripts/bench_prepare.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "device": device(), "versions": versions(),
            "settings": {"workers": a.workers, "val_fraction": 0.0005, "tokenizer": "GPT-2 (50,257, uint16)",
                         "repeat": a.repeat, "corpus": info,
                         "nanogpt_encoding": "tiktoken.Encoding built like tiktoken_ext.openai_public.gpt2() from "
                                             "the local merges.txt (sha256 == OpenAI's vocab.bpe) and vocab.json: "
                                             "no network for tiktoken.get_encoding('gpt2')",
                         "gpt2fit_encoding": "tiktoken.Encoding built by gpt2fit from tokenizer.json's vocab/merges"},
            "runs": runs,
            "notes": a.notes,
        }
        if len(sums) == 2:
            (ta, ca), (tb, cb) = sums["gpt2fit"], sums["nanogpt"]
            result["identical_ids"] = bool(ta == tb and ca == cb)
            result["identical_ids_how"] = ("every document's token sequence (split at EOT, sha1) over train+val, "
                                           "compared as multisets; nanoGPT shuffles documents between its splits")
            best = {k: min(v, key=lambda m: m["wall_s"]) for k, v in runs.items()}
            result["summary"] = {
                "gpt2fit_tokens_per_s": best["gpt2fit"]["tokens_per_s"],
                "nanogpt_tokens_per_s": best["nanogpt"]["tokens_per_s"],
                "speedup": round(best["gpt2fit"]["tokens_per_s"] / best["nanogpt"]["tokens_per_s"], 3),
                "gpt2fit_peak_rss_gib": max(m["peak_rss_gib"] for m in runs["gpt2fit"]),
                "nanogpt_peak_rss_gib": max(m["peak_rss_gib"] for m in runs["nanogpt"]),
                "best_of": a.repeat,
            }
        elif runs["gpt2fit"]:
            result["summary"] = {"gpt2fit_tokens_per_s": max(m["tokens_per_s"] for m in runs["gpt2fit"]),
                                 "gpt2fit_peak_rss_gib": max(m["peak_rss_gib"] for m in runs["gpt2fit"])}
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result.get("summary", {}), indent=2), f"identical_ids={result.get('identical_ids')}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
