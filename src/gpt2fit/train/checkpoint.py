"""Checkpoints: atomic, verified, rotated; the final Hugging Face export.

A checkpoint is written by ``Accelerator.save_state`` into ``checkpoints/.tmp-step_<N>/``, then
``trainer_state.json`` (step, data position, counters) and ``MANIFEST.json`` (every file, its size
and its xxh3-128 hash) are added, every file is fsynced, and the directory is renamed to ``step_<N>``
(and the rename fsynced). A rename is atomic, so a dir named ``step_<N>`` is always complete, also
after a power cut; a kill mid-save leaves only a ``.tmp-*`` dir, which is ignored and cleaned up.
Resuming checks every file's hash first, so a checkpoint damaged in any byte (a bad disk, a copy cut
short, a file overwritten in place) fails with a message naming the file instead of resuming silently
from wrong state; ``--resume auto`` then falls back to the newest intact checkpoint and keeps the
damaged one, renamed ``damaged-step_<N>``. xxh3 hashes at ~11 GB/s in memory, so the cost is the disk
read (benchmarks/checkpoint_hash/). Under DeepSpeed, save_state writes DeepSpeed's own sharded format
(``pytorch_model/*.pt``, pickles that DeepSpeed loads in full, not weights-only: resume only from
checkpoints you wrote); under FSDP, torch.distributed.checkpoint shards. The manifest covers all.
"""

import errno
import json
import os
import shutil
import sys
from pathlib import Path

import xxhash
from accelerate.utils import DistributedType, broadcast_object_list

from gpt2fit import formats
from gpt2fit.errors import UserError, first_line
from gpt2fit.evaluate.model import save_tokenizer

step_dir = formats.checkpoint_dir
complete_checkpoints = formats.complete_checkpoints


def file_hash(path: Path, chunk: int = 16 * 2**20) -> str:
    """xxh3-128 of a file's bytes, read in 16 MiB chunks."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify(path: Path) -> dict:
    """Check every file of a checkpoint against its manifest (size, then hash); return its trainer state."""
    path = Path(path)
    manifest_path = path / formats.CKPT_MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"checkpoint {path} is incomplete (no {formats.CKPT_MANIFEST}); it was interrupted while "
                        "saving. Use --resume auto to pick the newest complete one.")
    try:
        manifest = json.loads(manifest_path.read_text())
        state = json.loads((path / formats.CKPT_STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is damaged ({e}); resume from an earlier one.") from None
    for rel, entry in manifest["files"].items():
        f = path / rel
        size, digest = (entry, None) if isinstance(entry, int) else (entry["size"], entry["xxh3_128"])
        if not f.is_file() or f.stat().st_size != size:
            actual = f.stat().st_size if f.is_file() else "missing"
            raise UserError(f"checkpoint {path} is damaged: {rel} is {actual} bytes, expected {size}; "
                            "resume from an earlier checkpoint (--resume PATH).")
        if digest is not None and file_hash(f) != digest:
            raise UserError(f"checkpoint {path} is damaged: {rel} does not match the hash recorded when it was "
                            "saved; resume from an earlier checkpoint (--resume PATH).")
    return state


def quarantine(path: Path) -> Path:
    """Rename a damaged checkpoint out of the way (``damaged-step_<N>``), never deleting it."""
    dest = path.with_name(f"damaged-{path.name}")
    k = 1
    while dest.exists():
        k += 1
        dest = path.with_name(f"damaged-{path.name}-{k}")
    os.replace(path, dest)
    return dest


def save(accelerator, run_dir, step: int, state: dict, keep: int) -> Path:
    """Save a resumable checkpoint atomically; keep the newest ``keep``. All ranks must call this."""
    final = step_dir(run_dir, step)
    tmp = final.parent / f".tmp-{final.name}"
    if accelerator.is_main_process:
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / formats.CKPT_STATE).write_text(json.dumps(state, indent=2))
            paths_ = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
            for p in paths_:  # on disk before the rename, or a power cut could leave step_<N> with holes
                formats.fsync(p)
            files = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "xxh3_128": file_hash(p)} for p in paths_}
            (tmp / formats.CKPT_MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=2))
            formats.fsync(tmp / formats.CKPT_MANIFEST)
            formats.fsync(tmp)
            if final.exists():  # re-saving the same step (e.g. a resumed, already finished run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            formats.fsync(final.parent)  # and the rename itself
            rotate(run_dir, keep)
    except Exception as e:  # torch.save raises RuntimeError, safetensors SafetensorError on a full disk
        free = shutil.disk_usage(final.parent).free  # before the temp dir is removed and frees its space
        full = getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e) or free < 2**20
        shutil.rmtree(tmp, ignore_errors=True)
        if not (full or isinstance(e, OSError)):
            raise
        prev = complete_checkpoints(run_dir)
        kept = f"the previous checkpoint {prev[-1].name} is intact" if prev else "no earlier checkpoint exists"
        why = "the disk is full" if full else e.strerror or str(e)
        raise UserError(f"could not save checkpoint step {step}: {why} ({getattr(e, 'filename', None) or tmp}); "
                        f"{kept}. Free space and resume with --resume auto.") from None
    accelerator.wait_for_everyone()
    return final


def rotate(run_dir, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftover temp dirs."""
    ckpts = complete_checkpoints(run_dir)
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in (Path(run_dir) / formats.CHECKPOINTS).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def find_resume(accelerator, run_dir, resume: str | None) -> tuple[Path | None, dict | None]:
    """(checkpoint, its trainer state) to resume from, verified; (None, None) when there is none.

    --resume auto takes the newest checkpoint that verifies; a damaged one is renamed (kept) and
    the one before it tried. --resume PATH takes that checkpoint or fails. The main process
    decides (and renames); every rank gets its answer, so all ranks resume from the same one or
    all raise the same error."""
    answer = [None]
    if accelerator.is_main_process:
        try:
            answer = [find(run_dir, resume)]
        except UserError as e:
            answer = [e]
    broadcast_object_list(answer)
    if isinstance(answer[0], UserError):
        raise answer[0]
    return answer[0] if answer[0] is not None else (None, None)


def find(run_dir, resume: str | None) -> tuple[Path, dict] | None:
    """find_resume's decision, in this process (renames damaged checkpoints under --resume auto)."""
    if resume is None:
        return None
    if resume != "auto":
        p = Path(resume)
        if not p.is_dir():
            raise UserError(f"--resume {resume!r}: no such checkpoint dir; use --resume auto or a path like "
                            f"{step_dir(run_dir, 1000)}.")
        return p, verify(p)
    for p in reversed(complete_checkpoints(run_dir)):
        try:
            return p, verify(p)
        except UserError as e:
            dest = quarantine(p)
            print(f"warning: {e}\nwarning: kept it as {dest}; trying the checkpoint before it.",
                  file=sys.stderr, flush=True)
    return None


def load(accelerator, path: Path) -> None:
    """Restore model, optimizer, scheduler, scaler and RNG states (``find_resume`` verified them)."""
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"cannot resume from {path}: {first_line(e)[:300]}. Did the model shape or optimizer change "
                        "since it was saved? Resume with the run's own config.yaml settings, or start a new "
                        "out_dir.") from None


def export_final(accelerator, model, tokenizer, run_dir) -> Path:
    """Write final/ (safetensors, config, generation config, tokenizer) atomically: a model dir that
    transformers 4.x and 5.x load (``save_tokenizer``), its generation config the model's own (as
    stock GPT-2's: bos/eos, greedy unless asked). ``model`` is the prepared ``CausalLM``; every rank
    calls this (FSDP/DeepSpeed gather the full state dict collectively), the main process writes."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.mixed_precision != "no":
        # DeepSpeed's module holds 16-bit copies; gather the fp32 master weights (every rank calls this)
        from deepspeed.utils import safe_get_full_fp32_param

        state_dict = {n: safe_get_full_fp32_param(p) for n, p in accelerator.unwrap_model(model).named_parameters()}
    else:
        state_dict = accelerator.get_state_dict(model)
    lm = accelerator.unwrap_model(model, keep_torch_compile=False).lm
    final = Path(run_dir) / formats.FINAL
    tmp = final.parent / ".tmp-final"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        # torch.compile puts "_orig_mod." in the names (before everything, or inside each compiled block)
        state_dict = {k.replace("_orig_mod.", ""): v for k, v in state_dict.items()}
        lm_state = {k[len("lm."):]: v for k, v in state_dict.items() if k.startswith("lm.")}
        missing = sorted(set(dict(lm.named_parameters())) - set(lm_state))
        if missing:  # never write a final/ without its weights
            raise RuntimeError(f"export: {len(missing)} weights missing from the state dict, e.g. {missing[:3]}; "
                               f"got keys like {list(state_dict)[:3]}")
        lm.save_pretrained(tmp, state_dict=lm_state, safe_serialization=True)
        save_tokenizer(tokenizer, tmp, lm.config.n_positions)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final
