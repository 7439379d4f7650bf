"""What hashing every checkpoint file costs, on a gpt2-medium-sized checkpoint (weights + AdamW).

Saves the real checkpoint (train.checkpoint.save: Accelerate state, fsync, manifest with xxh3-128
per file) of gpt2-medium after one AdamW step on the CPU, then times, side by side in one process:
  - save with hashing vs save with a no-op hash (same fsyncs, same files);
  - verify() (reads and hashes every file) from the page cache, and after dropping the page cache
    (root only: /proc/sys/vm/drop_caches), which is what a resume after a reboot pays.
Writes result.json beside this file.  Usage: python benchmarks/checkpoint_hash/run.py [--out DIR]
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import accelerate
import torch
import transformers
import xxhash
from accelerate import Accelerator

from gpt2fit.config import ModelArgs, OptimArgs
from gpt2fit.train import checkpoint as ckpt
from gpt2fit.train.model import CausalLM, build_model
from gpt2fit.train.optim import build_optimizer


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).parent), help="where result.json goes")
    ap.add_argument("--preset", default="gpt2-medium", help="model size")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    acc = Accelerator(cpu=True)
    model = CausalLM(build_model(ModelArgs(preset=args.preset, block_size=1024), 50257, 0, eot_id=50256))
    opt = build_optimizer(model, OptimArgs(), "cpu")
    model, opt = acc.prepare(model, opt)
    x = torch.randint(0, 50257, (1, 9))
    model(x[:, :-1], x[:, 1:]).backward()
    opt.step()  # AdamW's exp_avg / exp_avg_sq now exist: the checkpoint has its real size
    opt.zero_grad(set_to_none=True)
    root = Path(tempfile.mkdtemp(prefix="ckpt-hash-", dir=os.environ.get("BENCH_TMP", "/tmp")))
    rows = {}
    real_hash = ckpt.file_hash
    try:
        for label, fn in (("save_with_hash", real_hash), ("save_no_hash", lambda p: ""),
                          ("save_with_hash_again", real_hash)):
            ckpt.file_hash = fn
            run = root / label
            t = time.perf_counter()
            path = ckpt.save(acc, run, 1, {"step": 1}, keep=1)
            rows[label] = round(time.perf_counter() - t, 3)
        ckpt.file_hash = real_hash
        path = ckpt.step_dir(root / "save_with_hash", 1)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        t = time.perf_counter()
        ckpt.verify(path)
        rows["verify_page_cache"] = round(time.perf_counter() - t, 3)
        if drop_caches():
            t = time.perf_counter()
            ckpt.verify(path)
            rows["verify_cold"] = round(time.perf_counter() - t, 3)
    finally:
        ckpt.file_hash = real_hash
        shutil.rmtree(root, ignore_errors=True)
    result = {
        "what": "cost of xxh3-128 hashing every checkpoint file (save and resume-time verify)",
        "command": "python benchmarks/checkpoint_hash/run.py",
        "model": args.preset, "checkpoint_bytes": size,
        "seconds": rows,
        "hash_only_page_cache_gb_per_s": round(size / rows["verify_page_cache"] / 1e9, 2),
        "note": "save_* run the same save (Accelerate state, fsync of every file, rename) with and without "
                "hashing; their spread between identical runs on this shared 2-core machine is the noise "
                "floor. verify_* read and hash every file, as a resume does.",
        "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                   "python": sys.version.split()[0], "load_average_1_5_15_min": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "accelerate": accelerate.__version__, "xxhash": xxhash.VERSION},
        "date": time.strftime("%Y-%m-%d"),
    }
    out = Path(args.out) / "result.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
