#!/usr/bin/env bash
# gpt2fit's full GPU benchmark suite: about 15 minutes on one H100, so two device calls (below).
# The FIRST call of a GPU window runs benchmarks/gpu/first_call.sh instead (6 minutes: the priority
# parts, trimmed); it sources this file for the helpers and runs its own list of parts.
#
# The GPU host's image has torch, transformers and accelerate but not bitsandbytes or datasets.
# On the dev machine, first: `bash benchmarks/gpu/first_call.sh prep` (wheels into .whl/, the GPT-2
# tokenizer into data/gpt2-tokenizer; both carried along). Then on the GPU host, from the repository root:
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
#   bash benchmarks/gpu/run_all.sh
#
# Every cell is gpt2fit's real step (train.setup + train.train_step) at block 1024, bf16, with W
# warm-up and N timed optimizer steps; see benchmarks/README.md. The parts, in priority order (a
# part that would not finish inside BUDGET_S seconds, default 510, is skipped; a part cut off by
# the budget keeps every cell it finished, because the bench rewrites its JSON after each cell):
#   gpt2_core     gpt2, random ids, micro 16: checkpointing x 8-bit AdamW, chunked loss, eager
#                 attention; + transformers.Trainer on the same config -> speedup_vs_trainer
#   mem12         --max_memory 12GiB (the planner check): gpt2 (micro 16) and gpt2-medium (micro
#                 8, 16) x checkpointing x optimizer x loss_chunk_size 0/4096, pad_vocab_to 64;
#                 predicted_peak_bytes (plan.memory.estimate_memory) beside the measured peaks and OOMs
#   medium_core   gpt2-medium, as gpt2_core (with its Trainer baseline)
#   loader        gpt2 default through the real DataLoader (token file on disk), num_workers 0 / 2,
#                 and without pinned memory
#   gpt2_levers   SDPA kernels (flash, efficient, math, cudnn), TF32 off, micro 8 / 32, and
#                 torch.compile at the 12 GB recipe's settings (compare with mem12's same row)
#   gpt2_compile  host_sync step/log; torch.compile whole model vs per block (regional); compile modes
#                 reduce-overhead (CUDA graphs) and max-autotune-no-cudagraphs; compile + host_sync=log
#   medium_recipe the gpt2-medium 12 GB recipe's step (checkpointing, chunked loss, compile) at 12 GiB
#   engines       DeepSpeed ZeRO-2, ZeRO-3 + offload, FSDP2 (+ offload), one process each: train,
#                 resume, export; then gpt2-xl full finetune under 12 GiB with offload (engines.sh)
# Results go to $OUT if set (the device tool brings back at most 8 files), else
# benchmarks/gpu/results/ (with SMOKE=1 a temp dir): gpu_bench.json (every run, raw step times),
# gpu_bench.md (tables and the planner check), planner_rows.json (copy into benchmarks/ for
# `gpt2fit plan`), run_all.log.
# The short summary table is printed last. `SMOKE=1 BUDGET_S=900 bash benchmarks/gpu/run_all.sh`
# runs the same flow on a CPU with a tiny model (to check the script, not to measure anything).
# The parts need more than one 600 s device call: run them in two, e.g.
#   PARTS="gpt2_core mem12 medium_core loader medium_recipe" bash benchmarks/gpu/run_all.sh
#   PARTS="gpt2_levers gpt2_compile" bash benchmarks/gpu/run_all.sh
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
ROOT=$PWD
RES=${OUT:-$ROOT/benchmarks/gpu/results}
if [[ ${SMOKE:-0} == 1 && -z ${OUT:-} ]]; then  # a CPU check's numbers are not results
  RES=$(mktemp -d "${TMPDIR:-/tmp}/gpt2fit-gpu-smoke.XXXXXX")
fi
BUDGET_S=${BUDGET_S:-510}
PY=${PYTHON:-python3}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT/src"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
RAW=$(mktemp -d "${TMPDIR:-/tmp}/gpt2fit-gpu-bench.XXXXXX")
mkdir -p "$RES"
LOG=$RES/${LOG_NAME:-run_all.log}
: >"$LOG"

say() { echo "$*" | tee -a "$LOG"; }

# fits NAME EST_SECONDS: whether PARTS (a space-separated list of part names, if set) selects the
# part and the budget has EST_SECONDS left for it; says why not
fits() {
  if [[ -n ${PARTS:-} && " $PARTS " != *" $1 "* ]]; then
    return 1
  fi
  local left=$((BUDGET_S - SECONDS))
  if ((left < $2)); then
    say "--- $1: skipped ($left s of the budget left, needs ~$2 s)"
    return 1
  fi
}

# run_part NAME EST_SECONDS CMD...: run CMD (output to the log) until the budget's end; on a GPU also
# at most 2 x EST + 30 s, so a part that hangs leaves the parts after it their time
run_part() {
  local name=$1 est=$2 left=$((BUDGET_S - SECONDS)) t0=$SECONDS; shift 2
  local limit=$left
  if [[ ${SMOKE:-0} != 1 ]] && ((2 * est + 30 < left)); then limit=$((2 * est + 30)); fi
  say "--- $name (~$est s, $left s left, stops after $limit s)"
  local shown="$*"
  shown=${shown/#"$PY -m gpt2fit.cli "/gpt2fit }
  echo "    ${shown/#"$PY "/python }" >>"$LOG"
  timeout -s INT -k 20 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  say "    $name: exit $rc after $((SECONDS - t0)) s"
  TIMES+=("$name $((SECONDS - t0))s rc=$rc")
  if ((rc != 0)); then grep -E '^\[|^    ([0-9]|out of|failed)|error:|Error' "$LOG" | tail -n 8; fi
  return $rc
}

# part NAME EST_SECONDS bench-flags...: one `gpt2fit bench` into $RAW/NAME.json, if it fits
part() {
  local name=$1 est=$2
  fits "$name" "$est" || return 0
  shift 2
  run_part "$name" "$est" "$PY" -m gpt2fit.cli bench "$@" "${SMOKE_FLAGS[@]}" --out "$RAW/$name.json"
}
TIMES=()

# preflight TITLE: the banner, the versions and the GPU as it names itself; fails if gpt2fit's bench
# does not import (a version mismatch on the GPU host then costs seconds, not every part)
preflight() {
  say "$1: $(date -u +%FT%TZ), budget $BUDGET_S s, results in $RES"
  if [[ ${SMOKE:-0} == 1 ]]; then say "SMOKE=1: a tiny model (this checks the script; it measures nothing)"; fi
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --format=csv \
      --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu,power.draw \
      2>&1 | tee -a "$LOG"
  fi
  "$PY" - <<'PYEOF' 2>&1 | tee -a "$LOG"
import importlib.util, sys, torch, transformers, accelerate
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), transformers "
      f"{transformers.__version__}, accelerate {accelerate.__version__}; GPU: "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}")
for m in ("bitsandbytes", "flash_attn"):
    if importlib.util.find_spec(m) is None:
        print(f"note: {m} is not installed" + (": the adamw8bit cells will be error rows (install the .whl wheels)"
                                                 if m == "bitsandbytes" else ""))
import gpt2fit.train.bench  # noqa: E402,F401 - everything a part imports
PYEOF
}

# loader_data: DATA_FLAGS for the loader part: the stdlib in GPT-2 tokens when a GPT-2 tokenizer dir is
# at hand (data/gpt2-tokenizer, carried; else ../shared's), else none (the bench's random ids on disk:
# the same bytes per token)
loader_data() {
  DATA_FLAGS=()
  local tok=${GPT2_TOKENIZER:-$ROOT/data/gpt2-tokenizer}
  [[ -f $tok/tokenizer.json ]] || tok=$ROOT/../shared/gpt2-tokenizer
  [[ -f $tok/tokenizer.json ]] || return 0
  if timeout 60 "$PY" -m gpt2fit.cli prepare --input stdlib --tokenizer "$tok" --out_dir "$RAW/stdlib-gpt2" \
      --max_chars 20000000 --workers 8 --quiet >>"$LOG" 2>&1; then
    DATA_FLAGS=(--data_dir "$RAW/stdlib-gpt2")
    say "    loader: stdlib tokenized with $tok"
  else
    say "    loader: preparing stdlib failed (see the log); using random token ids on disk"
  fi
}

summarize() {
  say "--- summary ($SECONDS s so far; ${TIMES[*]:-no parts ran})"
  "$PY" "$ROOT/benchmarks/gpu/summarize.py" "$RAW" "$RES" 2>&1 | tee -a "$LOG" && rm -rf "$RAW"
}

MODEL_FLAGS=(--block_size 1024 --mixed_precision bf16)
SMOKE_FLAGS=()
if [[ ${SMOKE:-0} == 1 ]]; then  # the whole flow on a CPU in a few minutes: a 1-layer model, block 32
  MODEL_FLAGS=(--block_size 32)
  SMOKE_FLAGS=(--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --vocab_size 512 --warmup 1 --steps 2)
fi

# sourced (by first_call.sh): the helpers above, nothing run
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

preflight "gpt2fit GPU suite" || exit 1

part gpt2_core 80 --preset gpt2 --micro_batch_size 16 "${MODEL_FLAGS[@]}" --warmup 3 --steps 10 \
  --grid grad_checkpointing=false,true optimizer=adamw,adamw8bit \
  --grid loss_chunk_size=4096 --grid attn_implementation=eager --baseline trainer

part mem12 120 "${MODEL_FLAGS[@]}" --max_memory 12GiB --warmup 2 --steps 3 \
  --grid preset=gpt2 micro_batch_size=16 pad_vocab_to=64 grad_checkpointing=false,true \
  optimizer=adamw,adamw8bit loss_chunk_size=0,4096 \
  --grid preset=gpt2-medium micro_batch_size=8,16 pad_vocab_to=64 grad_checkpointing=false,true \
  optimizer=adamw,adamw8bit loss_chunk_size=0,4096

part medium_core 90 --preset gpt2-medium --micro_batch_size 16 "${MODEL_FLAGS[@]}" --warmup 3 --steps 8 \
  --grid grad_checkpointing=false,true optimizer=adamw,adamw8bit \
  --grid loss_chunk_size=4096 --grid attn_implementation=eager --baseline trainer

if fits loader 60; then
  loader_data
  part loader 35 --preset gpt2 --micro_batch_size 16 "${MODEL_FLAGS[@]}" --warmup 3 --steps 10 "${DATA_FLAGS[@]}" \
    --grid data=random --grid data=loader num_workers=0,2 --grid data=loader pin_memory=false
fi

part gpt2_levers 130 --preset gpt2 --micro_batch_size 16 "${MODEL_FLAGS[@]}" --warmup 3 --steps 10 \
  --grid sdpa_backend=flash,efficient,math,cudnn --grid tf32=false --grid micro_batch_size=8,32 \
  --grid compile=true loss_chunk_size=4096 pad_vocab_to=64 max_memory=12GiB

# compile variants and the sync-free step, at the plain gpt2 cell (compare with gpt2_core's first row)
part gpt2_compile 300 --preset gpt2 --micro_batch_size 16 "${MODEL_FLAGS[@]}" --warmup 3 --steps 10 \
  --grid host_sync=step,log --grid compile=true compile_scope=model,blocks \
  --grid compile=true compile_mode=reduce-overhead,max-autotune-no-cudagraphs --grid compile=true host_sync=log

part medium_recipe 100 --preset gpt2-medium --micro_batch_size 16 "${MODEL_FLAGS[@]}" --warmup 3 --steps 5 \
  --max_memory 12GiB --grid compile=true grad_checkpointing=true loss_chunk_size=4096 pad_vocab_to=64

# Accelerate's engines, one process each, then GPT-2 XL under 12 GiB with offload (issue #16)
fits engines 300 && run_part engines 300 bash "$ROOT/benchmarks/gpu/engines.sh" "$RAW" "$LOG"

summarize
