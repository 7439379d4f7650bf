"""Publish a run on the Hugging Face Hub: `gpt2fit push` (one commit; example: EPILOG) and background pushes.

One commit at the repo root: final/'s files, README.md (the card, uploaded from memory: the run dir is never written,
and model and card land together or not at all), loss.png, eval_results.json and TensorBoard's event files. With
--include_checkpoints each complete checkpoint follows as a complete model dir on its branch ``step<N>`` (as Pythia
publishes them); optimizer, scheduler and RNG state stay local. Background pushes (:class:`BackgroundPusher`) run
on ``HfApi.run_as_future`` (one worker, in order), each from a snapshot (the trainer rotates checkpoints away). The
token comes from ``HF_TOKEN`` or ``hf auth login`` (no ``--token``: shell history); errors pass through ``redact``."""

import concurrent.futures
import http
import itertools
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import (CommitOperationAdd, CommitOperationDelete, HfApi, constants, get_session, get_token,
                             is_offline_mode)
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, filter_repo_objects, validate_repo_id
from safetensors.torch import load_file, save_file

from gpt2fit import __version__, formats, options
from gpt2fit.errors import UserError, first_line
from gpt2fit.evaluate.model import save_tokenizer
from gpt2fit.options import opt
from gpt2fit.publish.card import build_model_card, gather, redact
from gpt2fit.units import GiB, KiB, MiB, format_bytes

logger = logging.getLogger(__name__)

DEFAULT_RETRIES = 4  # retries after the first attempt: waits 2, 4, 8, 16 s with backoff=2.0
DEFAULT_BACKOFF = 2.0
MAX_BACKOFF_S = 60.0

RUN_EXTRAS = (formats.PLOT, formats.EVAL_RESULTS)  # pushed next to final/ (repo root)
# final/'s files that a checkpoint's model dir shares: config, generation config, tokenizer
MODEL_FILES, NOT_MODEL_FILES = ["*.json", "*.txt", "*.model"], ["*.index.json", "README.md"]


def check_repo_id(repo_id: str | None) -> str:
    """'namespace/name' or a UserError; the training loop calls this before its first step."""
    if not repo_id:
        raise UserError("--repo_id is required, e.g. --repo_id your-username/my-gpt2")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        example = repo_id.strip("/").split("/")[-1] or "my-gpt2"
        raise UserError(f"repo id {repo_id!r} must be 'namespace/name', e.g. 'your-username/{example}'")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise UserError(f"invalid repo id {repo_id!r}: {first_line(e)}") from e
    return repo_id


def _check_online() -> None:
    if is_offline_mode():
        raise UserError("pushing needs the network but HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1) is set — "
                        "unset it for this command, e.g. `env -u HF_HUB_OFFLINE gpt2fit push ...`")


def _status_of(exc: BaseException) -> int | None:
    return exc.response.status_code if isinstance(exc, HfHubHTTPError) else None


def _network_errors() -> tuple[type[BaseException], ...]:
    """What a failed connection raises: the HTTP client's TransportError, OS errors, a proxy's non-JSON page."""
    client = sys.modules[type(get_session()).__module__.split(".")[0]]
    return (client.TransportError, ConnectionError, TimeoutError, json.JSONDecodeError)


def _is_retryable(exc: BaseException) -> bool:
    status = _status_of(exc)
    if status is not None:
        return status >= 500 or status in (408, 429)
    return isinstance(exc, _network_errors()) and not isinstance(exc, OfflineModeIsEnabled)


def _has_token(api: HfApi) -> bool:
    """Whether huggingface_hub finds a token at all (the token itself is not kept)."""
    try:
        return bool(api.token) or get_token() is not None
    except Exception:  # noqa: BLE001 - e.g. a failing OIDC exchange: say none was found
        return False


def _explain(exc: BaseException, api: HfApi, repo_id: str, revision: str | None, attempts: int) -> str:
    """A UserError message: first line = what failed and the fix; then the server's words."""
    target = f"push to {repo_id!r}" + (f" (branch {revision!r})" if revision and revision != "main" else "")
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    status = _status_of(exc)
    if status is not None:
        phrase = next((s.phrase for s in http.HTTPStatus if s == status), "error")
        fix = {
            401: "set HF_TOKEN or run `hf auth login` (" + ("the token was rejected; use a valid token with write "
                 "access)" if _has_token(api) else "no token was found)"),
            403: f"your token cannot write to {repo_id.split('/')[0]!r}: use a write token "
                 "(https://huggingface.co/settings/tokens) or a namespace you own",
            404: "the repo or branch does not exist or your token cannot see it; check --repo_id and --revision",
            429: "rate limited by the Hub; wait a few minutes and push again",
        }.get(status, "the Hub is having trouble; push again later" if status >= 500 else
              "the Hub refused it")  # fmt: skip
        head = f"{target} failed{tries}: {status} {phrase} — {fix}"
    elif _is_retryable(exc):
        head = f"{target} failed{tries}: cannot reach {api.endpoint} ({type(exc).__name__}) — check your connection"
    else:
        head = f"{target} failed: {type(exc).__name__}"
    detail = str(exc).strip()
    return redact(f"{head}\n{detail}" if detail else head)


def _with_retries(attempt_fn: Callable[[], Any], *, api: HfApi, repo_id: str, revision: str | None, retries: int,
                  backoff: float, sleep: Callable[[float], None]):  # fmt: skip
    """Run ``attempt_fn``, retrying network errors, 5xx, 408 and 429 ``retries`` times (``backoff * 2**i`` s)."""
    for attempt in itertools.count():
        try:
            return attempt_fn()
        except UserError:
            raise
        except Exception as exc:  # classified below
            retryable = _is_retryable(exc)
            if retryable and attempt < retries:
                wait = min(backoff * (2**attempt), MAX_BACKOFF_S)
                logger.warning("push to %s: %s; retry %d/%d in %.1fs", repo_id, redact(first_line(exc)),
                               attempt + 1, retries, wait)  # fmt: skip
                sleep(wait)
                continue
            if not (retryable or isinstance(exc, (HfHubHTTPError, ValueError, OSError))):
                raise
            raise UserError(_explain(exc, api, repo_id, revision, attempt + 1)) from exc


def _hub_api(token: str | None, endpoint: str | None) -> HfApi:
    return HfApi(endpoint=endpoint, token=token, library_name="gpt2fit", library_version=__version__)


def repo_url(endpoint: str | None, repo_id: str, revision: str | None) -> str:
    url = f"{(endpoint or constants.ENDPOINT).rstrip('/')}/{repo_id}"
    return f"{url}/tree/{revision}" if revision and revision != "main" else url


def _commit(files: list[tuple[str, Path | bytes]], repo_id: str, *, commit_message: str, private: bool = False,
            revision: str | None = None, token: str | None = None, endpoint: str | None = None,
            retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
            sleep: Callable[[float], None] = time.sleep, exact: bool = False):  # fmt: skip
    """One commit of ``files`` ((path in repo, local file or bytes)) to ``repo_id`` (and branch), created if
    missing; ``exact``: also delete every other file of the branch (a new branch starts as a copy of main)."""
    check_repo_id(repo_id)
    _check_online()
    api = _hub_api(token, endpoint)

    def attempt():
        # private=None unless asked: a new repo follows the namespace's default visibility, an existing one is kept
        api.create_repo(repo_id, private=True if private else None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        # fresh operations per attempt: huggingface_hub mutates them and refuses to reuse them
        ops = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=data if isinstance(data, bytes) else str(data))
               for path, data in files]  # fmt: skip
        if exact:
            keep = {path for path, _ in files} | {".gitattributes"}
            ops += [CommitOperationDelete(path_in_repo=f.rfilename) for f in
                    api.repo_info(repo_id, revision=revision).siblings if f.rfilename not in keep]  # fmt: skip
        return api.create_commit(repo_id, operations=ops, commit_message=commit_message, revision=revision)

    return _with_retries(attempt, api=api, repo_id=repo_id, revision=revision, retries=retries, backoff=backoff,
                         sleep=sleep)  # fmt: skip


def push_folder(folder: str | os.PathLike, repo_id: str, *, path_in_repo: str | None = None,
                commit_message: str = "Upload with gpt2fit", **push_args):  # fmt: skip
    """Upload the files of ``folder`` under ``path_in_repo`` as one commit; ``push_args`` as for :func:`_commit`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"nothing to push: {folder} is not a directory")
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
    return _commit(_files(folder, prefix=prefix), repo_id, commit_message=commit_message, **push_args)


def _files(root: Path, *, allow=None, ignore=None, prefix: str = "") -> list[tuple[str, Path]]:
    """(path in repo, local file) for the files under ``root`` that the patterns let through."""
    rels = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    kept = filter_repo_objects(rels, allow_patterns=allow, ignore_patterns=ignore)
    return [(prefix + rel, root / rel) for rel in kept]


def run_files(run_dir: str | os.PathLike) -> list[tuple[str, Path]]:
    """(path in repo, local file) for what a push of ``run_dir`` uploads, README.md aside."""
    run = Path(run_dir)
    files = _files(run / formats.FINAL, ignore=["README.md"])
    files += [(extra, run / extra) for extra in RUN_EXTRAS if (run / extra).is_file()]
    return files + _files(run, allow=["*tfevents*"], ignore=[f"{formats.CHECKPOINTS}/*", f"{formats.FINAL}/*"])


def revision_of(checkpoint: Path) -> str:
    """The branch of a checkpoint, as Pythia names them: checkpoints/step_00001000 -> step1000."""
    return f"step{int(Path(checkpoint).name.rsplit('_', 1)[-1])}"


def checkpoint_model_dir(checkpoint: Path, template, dst: Path) -> None:
    """``checkpoint`` as a complete model dir in ``dst``: its weights without Accelerate's ``lm.`` and torch.compile's
    ``_orig_mod.``, the rest from ``template``: a model dir (the run's final/) or the (model, tokenizer) trained."""
    if isinstance(template, (str, os.PathLike)):
        if not (Path(template) / "config.json").is_file():  # never a branch of bare weights
            raise UserError(f"no model dir {template} to take the config and tokenizer of {checkpoint} from")
        snapshot(_files(Path(template), allow=MODEL_FILES, ignore=NOT_MODEL_FILES), dst)
    else:
        lm, tokenizer = template
        lm.config.save_pretrained(dst)
        lm.generation_config.save_pretrained(dst)
        save_tokenizer(tokenizer, dst, lm.config.n_positions)
    weights = load_file(Path(checkpoint) / "model.safetensors")
    save_file({k.replace("_orig_mod.", "").removeprefix("lm."): v for k, v in weights.items()},
              dst / "model.safetensors", metadata={"format": "pt"})


def snapshot(files: list[tuple[str, Path]], dst: Path) -> None:
    """Hard-link ``files`` into ``dst`` (survives the trainer deleting the original, costs no disk), else copy."""
    for rel, src in files:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst / rel)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src, dst / rel)


def _check_run_dir(run_dir: str | os.PathLike) -> Path:
    run = Path(run_dir)
    if not run.exists():
        raise UserError(f"run dir {str(run)!r} does not exist — pass the --out_dir of a `gpt2fit train` run")
    if not run.is_dir():
        raise UserError(f"{str(run)!r} is not a directory — pass the run dir written by `gpt2fit train`")
    if not (run / formats.FINAL / "config.json").is_file():
        if (run / "config.json").is_file():
            raise UserError(f"{run} is a model dir, not a run dir — push it with `hf upload REPO_ID {run}`")
        raise UserError(f"{run} has no final/ model — run `gpt2fit train ...` to completion first "
                        "(final/ is written when it ends)")  # fmt: skip
    return run


@dataclass
class PushResult:
    repo_id: str
    url: str  # the repo page (its branch page with a revision)
    commit_url: str | None
    files: list[tuple[str, int]]  # (path in repo, bytes)
    card: str  # the README.md that was (or, with dry_run, would be) pushed


def base_license(run: Path, token: str | None = None, endpoint: str | None = None) -> str | None:
    """The license on the Hub card of the run's base model; None when trained from scratch or unreadable."""
    base = gather(run).base_model
    try:
        data = _hub_api(token, endpoint).model_info(base).card_data if base else None
    except Exception as e:  # noqa: BLE001 - the card then states no license; say why
        logger.warning("could not read the license of %s (%s); pass --license", base, redact(first_line(e)))
        return None
    return getattr(data, "license", None)


def push_run(
    run_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
    include_checkpoints: bool = False, token: str | None = None, endpoint: str | None = None,
    license: str | None = None, commit_message: str | None = None, retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF, dry_run: bool = False, sleep: Callable[[float], None] = time.sleep,
) -> PushResult:  # fmt: skip
    """Push a finished run (module docstring); ``license`` None: the base model's; ``dry_run``: no network."""
    run = _check_run_dir(run_dir)
    check_repo_id(repo_id)
    files = run_files(run)
    ckpts = formats.complete_checkpoints(run) if include_checkpoints else []
    license = license or (None if dry_run else base_license(run, token, endpoint))
    card = str(build_model_card(run, repo_id=repo_id, license=license, revision=revision,
                                checkpoints=[revision_of(c) for c in ckpts]))  # fmt: skip
    card_bytes = card.encode("utf-8")
    listing = sorted([(path, local.stat().st_size) for path, local in files] + [("README.md", len(card_bytes))])
    shared = _files(run / formats.FINAL, allow=MODEL_FILES, ignore=NOT_MODEL_FILES) + [("model.safetensors", None)]
    listing += [(f"{revision_of(c)}:{path}", (local or c / path).stat().st_size)
                for c in ckpts for path, local in shared]  # fmt: skip
    url = repo_url(endpoint, repo_id, revision)
    if dry_run:
        return PushResult(repo_id, url, None, listing, card)
    push_args = dict(private=private, token=token, endpoint=endpoint, retries=retries, backoff=backoff, sleep=sleep)
    info = _commit([*files, ("README.md", card_bytes)], repo_id, revision=revision, **push_args,
                   commit_message=commit_message or f"gpt2fit: push {run.resolve().name}")  # fmt: skip
    for ckpt in ckpts:
        with tempfile.TemporaryDirectory(prefix="gpt2fit-push-") as tmp:
            checkpoint_model_dir(ckpt, run / formats.FINAL, Path(tmp))
            _commit(_files(Path(tmp)), repo_id, revision=revision_of(ckpt), exact=True, **push_args,
                    commit_message=f"gpt2fit: checkpoint {ckpt.name} of {run.resolve().name}")  # fmt: skip
    return PushResult(repo_id, url, info.commit_url, listing, card)


@dataclass
class Failure:
    """One upload that did not happen, and how to do it by hand."""

    folder: str
    path_in_repo: str | None
    error: str  # first line of the error, redacted
    command: str  # a shell command that pushes it later


class BackgroundPusher:
    """Uploads folders in the background so training never waits on the network. Nothing raises into the caller:
    failures are logged (redacted), returned by ``finish()`` (or ``with``) and explained by ``report()``."""

    def __init__(self, repo_id: str, *, private: bool = False, revision: str | None = None, token: str | None = None,
                 endpoint: str | None = None, retries: int = DEFAULT_RETRIES, backoff: float = DEFAULT_BACKOFF,
                 tmp_dir: str | os.PathLike | None = None, license: str | None = None, template=None):  # fmt: skip
        self.repo_id = check_repo_id(repo_id)  # fail before training starts, not at the first push
        self.private, self.revision, self.license = private, revision, license
        self.template = template  # (model, tokenizer) for checkpoints' model dirs; None: the run's final/
        self.revisions: list[str] = []  # checkpoint branches pushed, for the card
        self._push_args = {"private": private, "revision": revision, "token": token, "endpoint": endpoint,
                           "retries": retries, "backoff": backoff}  # fmt: skip
        self._tmp_dir, self._closed = tmp_dir, False
        self._api = _hub_api(token, endpoint)  # its run_as_future queue runs the uploads
        self._jobs: list[tuple[dict, concurrent.futures.Future]] = []
        self.failures: list[Failure] = []  # uploads that did not happen (see finish())
        self.pushed: list[str] = []  # branch, path_in_repo or folder of each successful push

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finish()
        return False

    def _fail(self, job: dict, error: str, log: bool = True) -> bool:
        """Record a failure with the command that pushes it later; False (for submit)."""
        folder, path_in_repo = Path(job["folder"]), job["path_in_repo"]
        flags = ["--repo_id", self.repo_id] + (["--private"] if self.private else [])
        flags += ["--revision", self.revision] if self.revision else []
        if job["run_dir"] or folder.name == formats.FINAL:
            command = ["gpt2fit", "push", str(folder if job["run_dir"] else folder.parent), *flags]
        elif folder.parent.name == formats.CHECKPOINTS:
            command = ["gpt2fit", "push", str(folder.parent.parent), *flags, "--include_checkpoints"]
        else:
            command = ["hf", "upload", self.repo_id, str(folder)] + ([path_in_repo] if path_in_repo else [])
            command += flags[2:]  # --private, --revision: the same for hf upload
        self.failures.append(Failure(str(folder), path_in_repo, redact(error), shlex.join(command)))
        if log:
            logger.warning("push of %s to %s failed: %s", folder, self.repo_id, redact(error))
        return False

    def submit(self, folder: str | os.PathLike, *, path_in_repo: str | None = None, commit_message: str | None = None,
               run_dir: bool = False) -> bool:  # fmt: skip
        """Queue an upload of ``folder`` (snapshotted now); True if queued; never raises. ``run_dir``: what `gpt2fit
        push` sends, the card built at upload time (listing the branches pushed before); a checkpoint: a complete
        model dir on its branch ``step<N>``; else the folder's files under ``path_in_repo`` (default: the root)."""
        folder = Path(folder)
        checkpoint = folder.parent.name == formats.CHECKPOINTS and not run_dir
        job = {"folder": folder, "path_in_repo": None if run_dir or checkpoint else path_in_repo, "run_dir": run_dir,
               "revision": revision_of(folder) if checkpoint else None}  # fmt: skip
        if self._closed:
            return self._fail(job, "submitted after finish(); not pushed")
        tmp = None
        try:
            if not folder.is_dir():
                raise UserError(f"{folder} is not a directory")
            tmp = Path(tempfile.mkdtemp(prefix="gpt2fit-push-", dir=self._tmp_dir))
            if run_dir:
                snapshot(run_files(_check_run_dir(folder)), tmp)
            elif checkpoint:  # converted now: the trainer may rotate the checkpoint away at once
                checkpoint_model_dir(folder, self.template or folder.parent.parent / formats.FINAL, tmp)
            else:
                snapshot(_files(folder), tmp)
        except Exception as e:  # noqa: BLE001 - never raise into training (e.g. rotated away mid-snapshot)
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            return self._fail(job, f"could not snapshot {folder}: {first_line(e)}")
        job["snapshot"] = tmp
        message = commit_message or f"gpt2fit: upload {job['revision'] or path_in_repo or folder.name}"
        self._jobs.append((job, self._api.run_as_future(self._upload, job, message)))
        return True

    def _upload(self, job: dict, message: str) -> None:
        try:
            if job["run_dir"]:
                license = self.license or base_license(job["folder"], self._push_args["token"], self._api.endpoint)
                card = build_model_card(job["folder"], repo_id=self.repo_id, license=license, revision=self.revision,
                                        checkpoints=self.revisions)  # fmt: skip
                (job["snapshot"] / "README.md").write_text(str(card), encoding="utf-8")
            branch = {"revision": job["revision"], "exact": True} if job["revision"] else {}
            push_folder(job["snapshot"], self.repo_id, path_in_repo=job["path_in_repo"], commit_message=message,
                        **{**self._push_args, **branch})  # fmt: skip
            self.revisions += [job["revision"]] if job["revision"] else []
        except Exception as e:
            logger.warning("push of %s to %s failed: %s", job["folder"], self.repo_id, redact(first_line(e)))
            raise  # logged now, recorded by finish()
        finally:
            shutil.rmtree(job["snapshot"], ignore_errors=True)

    def finish(self, timeout: float | None = None) -> list[Failure]:
        """Wait for queued uploads (at most ``timeout`` s) and refuse later submits; returns what was not pushed."""
        self._closed = True
        concurrent.futures.wait([future for _, future in self._jobs], timeout)
        for job, future in self._jobs:
            if not future.done():
                if future.cancel():
                    shutil.rmtree(job["snapshot"], ignore_errors=True)
                self._fail(job, f"not pushed: finish() stopped waiting after {timeout}s")
            elif future.exception() is not None:
                self._fail(job, first_line(future.exception()), log=False)
            else:
                self.pushed.append(job["revision"] or job["path_in_repo"] or str(job["folder"]))
        self._jobs = []
        return list(self.failures)

    def report(self) -> str:
        """Plain text: what was pushed, what was not, and the command to push it later."""
        lines = [f"hub: {len(self.pushed)} upload(s) to {self.repo_id} succeeded, {len(self.failures)} not pushed"]
        for f in self.failures:
            where = f" -> {f.path_in_repo}" if f.path_in_repo else ""
            gone = "" if Path(f.folder).exists() else " (the folder no longer exists locally)"
            lines.append(f"  not pushed: {f.folder}{where}{gone}: {f.error}")
            lines.append(f"    push it later with: {f.command}")
        if any(f.command.startswith("gpt2fit push") for f in self.failures):
            lines.append("  (`python scripts/push_to_hub.py RUN_DIR --repo_id ...` is the same command)")
        return redact("\n".join(lines))


DESCRIPTION = ("Push a finished run (final/ model, model card, loss.png, eval_results.json) to the Hugging Face "
               "Hub as one commit. The token comes from HF_TOKEN or `hf auth login`.")  # fmt: skip
EPILOG = "example: gpt2fit push runs/quickstart --repo_id your-username/gpt2-quickstart --private"


@dataclass
class PushOptions:
    """options"""

    run_dir: str = opt(None, "Run dir written by `gpt2fit train` (its --out_dir); must contain final/.",
                       positional=True)  # fmt: skip
    repo_id: str | None = opt(None, "Hub model repo as namespace/name, e.g. your-username/gpt2-tinystories; "
                                    "created if missing.")  # fmt: skip
    private: bool = opt(False, "Create the repo private (an existing repo keeps its visibility).")
    revision: str | None = opt(None, "Branch to push to, created from main if missing (default: main).")
    include_checkpoints: bool = opt(False, "Also push each complete checkpoint as a complete model on branch "
                                           "step<N> (from_pretrained(repo, revision='step1000')); optimizer state "
                                           "stays local.")  # fmt: skip
    license: str | None = opt(None, "License id for the model card, e.g. apache-2.0 (default: the base model's, "
                                    "read from its Hub card; none for a model trained from scratch).")
    endpoint: str | None = opt(None, "Hub URL (default: $HF_ENDPOINT or https://huggingface.co).")
    commit_message: str | None = opt(None, "Commit message (default: 'gpt2fit: push <run name>').")
    dry_run: bool = opt(False, "Print the model card and the files that would be pushed; no network.")


def _size(n: int) -> str:
    return f"{n} B" if n < KiB else format_bytes(n, "GiB" if n >= GiB else "MiB" if n >= MiB else "KiB")


def main(argv=None) -> int:
    (o,), _ = options.parse(argv, [PushOptions], prog="gpt2fit push", description=DESCRIPTION, epilog=EPILOG)
    run = _check_run_dir(o.run_dir)
    check_repo_id(o.repo_id)
    if not o.dry_run:
        _check_online()
        print(f"pushing {run} to {o.repo_id} ({o.revision or 'main'}) ...", flush=True)
    result = push_run(run, o.repo_id, **{k: v for k, v in vars(o).items() if k not in ("run_dir", "repo_id")})
    total = _size(sum(size for _, size in result.files))
    if o.dry_run:
        print(result.card)
        on_branch = "; step<N>:FILE is FILE on branch step<N>" if o.include_checkpoints else ""
        print(f"dry run: would push {len(result.files)} files ({total}) to {result.url}{on_branch}")
    else:
        print(f"pushed {len(result.files)} files ({total}):")
    for path, size in result.files:
        print(f"  {path:<40} {_size(size):>10}")
    if not o.dry_run:
        print(f"model: {result.url}\ncommit: {result.commit_url}")
    return 0
