"""Checkpoints: atomic, verified, rotated; the final Hugging Face export.

A checkpoint is written by ``Accelerator.save_state`` into ``checkpoints/.tmp-step_<N>/``, then
``trainer_state.json`` (step, data position, counters) and ``MANIFEST.json`` (every file and its
size) are added, every file is fsynced, and the directory is renamed to ``step_<N>`` (and the
rename fsynced). A rename is atomic, so a dir named ``step_<N>`` is always complete, also after a
power cut; a kill mid-save leaves only a ``.tmp-*`` dir, which is ignored
and cleaned up. Loading checks the manifest first, so a damaged checkpoint fails with a clear
message instead of inside torch.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from transformers import GenerationConfig

from gpt2fit import formats
from gpt2fit.errors import UserError

STATE = formats.CKPT_STATE
MANIFEST = formats.CKPT_MANIFEST
ckpt_root = formats.checkpoint_root
step_dir = formats.checkpoint_dir
complete_checkpoints = formats.complete_checkpoints


def verify(path: Path) -> dict:
    """Check a checkpoint against its manifest; return its trainer state."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise UserError(f"checkpoint {path} is incomplete (no {MANIFEST}); it was interrupted while saving. "
                        "Use --resume auto to pick the newest complete one.")
    try:
        manifest = json.loads(manifest_path.read_text())
        state = json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {path} is damaged ({e}); resume from an earlier one.") from None
    for rel, size in manifest["files"].items():
        f = path / rel
        if not f.is_file() or f.stat().st_size != size:
            actual = f.stat().st_size if f.is_file() else "missing"
            raise UserError(f"checkpoint {path} is damaged: {rel} is {actual} bytes, expected {size}; "
                            "resume from an earlier checkpoint (--resume PATH).")
    return state


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
            (tmp / STATE).write_text(json.dumps(state, indent=2))
            paths_ = [p for p in sorted(tmp.rglob("*")) if p.is_file()]
            for p in paths_:  # on disk before the rename, or a power cut could leave step_<N> with holes
                _fsync(p)
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in paths_}
            _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": files}, indent=2))
            _fsync(tmp)
            if final.exists():  # re-saving the same step (e.g. a resumed, already finished run)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync(final.parent)  # and the rename itself
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


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def rotate(run_dir, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftover temp dirs."""
    ckpts = complete_checkpoints(run_dir)
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for tmp in ckpt_root(run_dir).glob(".tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def find_resume(run_dir, resume: str | None) -> Path | None:
    """--resume auto -> newest complete checkpoint (or None); --resume PATH -> that checkpoint."""
    if resume is None:
        return None
    if resume == "auto":
        ckpts = complete_checkpoints(run_dir)
        return ckpts[-1] if ckpts else None
    p = Path(resume)
    if not p.is_dir():
        raise UserError(f"--resume {resume!r}: no such checkpoint dir; use --resume auto or a path like "
                        f"{step_dir(run_dir, 1000)}.")
    return p


def load(accelerator, path: Path) -> dict:
    """Restore model, optimizer, scheduler, scaler and RNG states; return the trainer state."""
    state = verify(path)
    try:
        accelerator.load_state(str(path))
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()[0][:300]
        raise UserError(f"cannot resume from {path}: {first}. Did the model shape or optimizer change since "
                        "it was saved? Resume with the run's own config.yaml settings, or start a new out_dir.") \
            from None
    return state


def export_final(accelerator, model, tokenizer, run_dir) -> Path:
    """Write final/ (safetensors, config, generation config, tokenizer) atomically.

    ``model`` is the prepared ``CausalLM``; every rank calls this (FSDP/DeepSpeed gather the full
    state dict collectively), the main process writes.
    """
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
        eot = tokenizer.eos_token_id
        GenerationConfig(bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, do_sample=True).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final
