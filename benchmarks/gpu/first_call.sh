#!/usr/bin/env bash
# The FIRST device call of a GPU window (issue #18): gpt2fit's priority GPU measurements in ONE call
# of about 6 minutes on one H100/H200, wheel install included, the short table printed last.
#
#   1. dev machine, once:   bash benchmarks/gpu/first_call.sh prep
#      (bash ../shared/gpu/fetch-wheels.sh -> .whl/; ../shared/gpt2-tokenizer -> data/gpt2-tokenizer;
#      both git-ignored; prints the size of what travels, which must stay under 64 MiB)
#   2. dev machine, check:  SMOKE=1 PYTHON=.venv/bin/python bash benchmarks/gpu/first_call.sh
#      (the same flow with a tiny model on the CPU, the wheel install line included: it installs the
#      wheels for CPython 3.12 x86-64 into a temp --target, so a typo or a missing wheel fails here)
#   3. the device call, with the device tool's `run`:
#        command:   bash benchmarks/gpu/first_call.sh
#        carry:     [".whl", "data/gpt2-tokenizer"]
#        timeout_s: 420
#      $OUT then holds: gpu_bench.json (raw: the device name as the GPU reports it, versions, every
#      setting and step time), gpu_bench.md, planner_rows.json, profile_step.json / .txt,
#      profile_step_trace.json.gz, first_call.log (7 files; the tool brings back at most 8).
#
# Budget: the parts run in this order while BUDGET_S (default 330 s, counted from the script's start)
# allows; each is skipped unless its estimate fits what is left, and stopped at the budget's end or at
# twice its estimate + 30 s (a hung part leaves the others their time).
# Estimates for one H100/H200, none measured yet: run_all.sh's per-part estimates (gpt2_core 80 s for
# 6 cells + the Trainer, mem12 120 s for 24 cells of 2 + 3 steps, medium_core 90 s for 6 cells + the
# Trainer, loader 35 s for 4 cells, gpt2_compile 300 s for 7 compiled cells) scaled to the cells here,
# an auto micro-batch cell counted as two (its probe); a python process with torch, transformers and
# accelerate imported and CUDA up ~10 s. The first call's log has every part's real time: fix these then.
#   wheels + preflight  ~25 s  pip install of .whl (bitsandbytes is 43 MB), the versions, the GPU
#   gpt2_core           ~55 s  gpt2, T=1024, bf16, micro 16: plain, checkpointing, adamw8bit, chunked
#                              loss; the transformers.Trainer baseline on the same settings
#   mem12               ~95 s  --max_memory 12GiB, predicted vs measured peak for every row: gpt2 micro
#                              16 without checkpointing x optimizer x loss chunk; gpt2-medium pretraining
#                              (vocab padded to 64) micro 16, checkpointing x chunked loss, + adamw8bit;
#                              the finetune shape (vocab 50257; random weights: no Hub there) with
#                              checkpointing + chunked loss; micro_batch_size=auto (the probe: the largest
#                              micro-batch) at the three 12 GB recipes' settings
#   medium_core         ~65 s  gpt2-medium as gpt2_core
#   profile             ~30 s  torch.profiler over two gpt2 steps (profile_step.py): top kernels, gaps
#   then only if the clock allows, each on its own estimate:
#   loader              ~50 s  the real DataLoader over GPT-2 tokens of the stdlib (prep ~20 s), workers
#                              0 / 2, pinning off
#   muon                ~30 s  --optimizer muon: gpt2 as gpt2_core's plain cell; gpt2-medium pretraining
#                              under 12GiB with checkpointing + chunked loss (the from-scratch recipe's)
#   compile             ~60 s  torch.compile of the plain gpt2 cell
#   host_sync           ~25 s  host_sync=step vs log at the plain gpt2 cell
# Priority ~270 s; the optional parts fill the rest of BUDGET_S; then the summary, ~10 s. Worst case
# 330 + 20 (a part stopped at the budget gets 20 s to exit) + 10 = 360 s: timeout_s 420 leaves a margin.
# The next calls run the rest: benchmarks/gpu/run_all.sh with PARTS (benchmarks/README.md).
set -uo pipefail

prep() {  # dev machine: the wheels and the tokenizer into git-ignored paths; the size of what travels
  cd "$(git -C "$(dirname "${BASH_SOURCE[0]}")" rev-parse --show-toplevel)" || return 1
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    bash ../shared/gpu/fetch-wheels.sh >/dev/null || return 1
  fi
  if [[ ! -f data/gpt2-tokenizer/tokenizer.json ]]; then
    mkdir -p data && cp -r ../shared/gpt2-tokenizer data/ && chmod -R u+w data/gpt2-tokenizer || return 1
  fi
  local p
  for p in .whl data/gpt2-tokenizer; do
    if ! git check-ignore -q "$p"; then
      echo "error: $p is not git-ignored: it would travel twice and be committed" >&2
      return 1
    fi
  done
  # what the device tool sends: tracked and untracked-not-ignored files, plus the carried paths
  local tree whl tok
  tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -n 1 | cut -f1)
  whl=$(du -sb .whl | cut -f1)
  tok=$(du -sb data/gpt2-tokenizer | cut -f1)
  awk -v t="$tree" -v w="$whl" -v k="$tok" 'BEGIN {
    m = 1048576; s = t + w + k
    printf "what travels: working tree %.1f MiB + .whl %.1f MiB + data/gpt2-tokenizer %.1f MiB = %.1f MiB of 64 MiB\n",
      t / m, w / m, k / m, s / m
    exit (s < 64 * m) ? 0 : 1 }' || { echo "error: over the device tool's 64 MiB" >&2; return 1; }
  echo 'device call: run(command="bash benchmarks/gpu/first_call.sh", carry=[".whl", "data/gpt2-tokenizer"],' \
    'timeout_s=420)'
}

if [[ ${1:-} == prep ]]; then
  prep
  exit
fi
if [[ ${SMOKE:-0} == 1 ]]; then
  (prep) || exit 1
  BUDGET_S=${BUDGET_S:-1500}  # the CPU is slow: run every part
fi
BUDGET_S=${BUDGET_S:-330}
LOG_NAME=first_call.log
# shellcheck source=benchmarks/gpu/run_all.sh
. "$(dirname "${BASH_SOURCE[0]}")/run_all.sh"  # the helpers (say, fits, part, preflight, ...); cd to the root

# -- the wheels: the install line of ../shared/gpu/fetch-wheels.sh's header ---------------------
PIP_INSTALL=(python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade)
WHEEL_MODULES=(bitsandbytes datasets dill multiprocess)

# drop_broken SITE: take each wheel that does not import against the image's packages out of SITE
# again: transformers imports datasets whenever it is installed (with the Trainer), so a broken one
# would fail every part
drop_broken() {
  local m
  for m in $(PYTHONPATH="$1:${PYTHONPATH:-}" "$PY" -c 'import contextlib, importlib, sys
for m in sys.argv[1:]:
    try:
        with contextlib.redirect_stdout(sys.stderr):  # stdout: the names of the broken ones alone
            importlib.import_module(m)
    except Exception as e:
        print(m)
        print(f"{m}: {type(e).__name__}: {e}", file=sys.stderr)' "${WHEEL_MODULES[@]}" 2>>"$LOG"); do
    say "    $m does not import here (see the log): removed from $1"
    rm -rf "${1:?}/$m" "$1/$m"-*.dist-info
  done
}

t0=$SECONDS
if [[ ${SMOKE:-0} == 1 ]]; then  # the same command for the GPU host's Python, into a throwaway target
  site=$(mktemp -d "${TMPDIR:-/tmp}/gpt2fit-site.XXXXXX")
  foreign=(--python-version 3.12 --implementation cp --only-binary=:all: --platform manylinux_2_28_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform any)
  say "--- wheels (SMOKE: for the GPU host's CPython 3.12): ${PIP_INSTALL[*]} --target $site .whl/*.whl ${foreign[*]}"
  "${PIP_INSTALL[@]}" --target "$site" .whl/*.whl "${foreign[@]}" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  for m in "${WHEEL_MODULES[@]}"; do
    [[ -d $site/$m ]] || { say "error: $m is not among the wheels in .whl/"; rc=1; }
  done
  ((rc == 0)) && drop_broken "$site"  # (pure-Python wheels: most import on this Python too)
  rm -rf "$site"
  ((rc == 0)) || { say "error: the wheel install line failed (exit $rc)"; exit 1; }
else
  say "--- wheels: ${PIP_INSTALL[*]} --target /tmp/site .whl/*.whl"
  "${PIP_INSTALL[@]}" --target /tmp/site .whl/*.whl 2>&1 | tee -a "$LOG" && export PYTHONPATH=/tmp/site:$PWD/src
  rc=$?
  if ((rc == 0)); then
    drop_broken /tmp/site
  else
    say "    the wheel install failed (exit $rc): going on without them (the adamw8bit cells will be errors)"
  fi
fi
say "    wheels: $((SECONDS - t0)) s"

preflight "gpt2fit GPU first call" || { say "error: gpt2fit's bench does not import (above); nothing can run"; exit 1; }

# -- the parts, in priority order ----------------------------------------------------------------
GPT2=(--preset gpt2 --micro_batch_size 16 "${MODEL_FLAGS[@]}" --warmup 3 --steps 10)
part gpt2_core 55 "${GPT2[@]}" --grid grad_checkpointing=false,true --grid optimizer=adamw8bit \
  --grid loss_chunk_size=4096 --baseline trainer

part mem12 95 "${MODEL_FLAGS[@]}" --max_memory 12GiB --warmup 2 --steps 3 \
  --grid preset=gpt2 micro_batch_size=16 pad_vocab_to=64 optimizer=adamw,adamw8bit loss_chunk_size=0,4096 \
  --grid preset=gpt2-medium micro_batch_size=16 pad_vocab_to=64 grad_checkpointing=true,false loss_chunk_size=4096,0 \
  --grid preset=gpt2-medium micro_batch_size=16 pad_vocab_to=64 grad_checkpointing=true loss_chunk_size=4096 \
  optimizer=adamw8bit \
  --grid preset=gpt2-medium micro_batch_size=16 pad_vocab_to=1 grad_checkpointing=true loss_chunk_size=4096 \
  --grid preset=gpt2 micro_batch_size=auto pad_vocab_to=64 loss_chunk_size=4096 \
  --grid preset=gpt2-medium micro_batch_size=auto pad_vocab_to=64,1 grad_checkpointing=true loss_chunk_size=4096

part medium_core 65 --preset gpt2-medium --micro_batch_size 16 "${MODEL_FLAGS[@]}" --warmup 3 --steps 8 \
  --grid grad_checkpointing=false,true --grid optimizer=adamw8bit --grid loss_chunk_size=4096 --baseline trainer

if fits profile 30; then
  run_part profile 30 "$PY" "$ROOT/benchmarks/gpu/profile_step.py" "${GPT2[@]}" "${SMOKE_FLAGS[@]}" --steps 2 \
    --out "$RES/profile_step.json" && head -n 3 "$RES/profile_step.txt" | tee -a "$LOG"
fi

if fits loader 50; then
  loader_data
  part loader 30 "${GPT2[@]}" "${DATA_FLAGS[@]}" \
    --grid data=random --grid data=loader num_workers=0,2 --grid data=loader pin_memory=false
fi
part muon 30 "${MODEL_FLAGS[@]}" --warmup 3 --steps 8 --grid preset=gpt2 micro_batch_size=16 optimizer=muon \
  --grid preset=gpt2-medium micro_batch_size=16 pad_vocab_to=64 grad_checkpointing=true loss_chunk_size=4096 \
  optimizer=muon max_memory=12GiB
part compile 60 "${GPT2[@]}" --grid compile=true
part host_sync 25 "${GPT2[@]}" --grid host_sync=step,log

summarize
