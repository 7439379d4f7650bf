#!/usr/bin/env bash
# Issue #3's GPU figure: the `shakespeare-char` recipe (nanoGPT's GPU config; nanoGPT's best val loss
# is 1.4697) trained on one GPU, then scored on the whole validation split. A few minutes on an H100.
#
# Needs data/tinyshakespeare.txt (git-ignored: copy it from ../shared/data/ and name it in the device
# call's carry). For each seed in SEEDS (default 1337): train, `gpt2fit eval` over the full val split,
# and copy summary.json, metrics.jsonl, config.yaml and the logs to $OUT/seed_S (or
# benchmarks/shakespeare_char_gpu/seed_S). EXTRA adds train flags (e.g. "--compile true").
# `SMOKE=1` runs the same flow with a tiny model for 20 steps (to check the script on a CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
RES=${OUT:-$ROOT/benchmarks/shakespeare_char_gpu}
WORK=${WORK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/gpt2fit-shakespeare.XXXXXX")}
PY=${PYTHON:-python3}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$ROOT/src" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error
TEXT=$ROOT/data/tinyshakespeare.txt
if [[ ! -f $TEXT ]]; then
  echo "error: $TEXT is missing; copy it from ../shared/data/tinyshakespeare.txt (and carry it to the GPU host)" >&2
  exit 2
fi
read -r -a extra <<<"${EXTRA:-}"
if [[ ${SMOKE:-0} == 1 ]]; then
  extra+=(--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --micro_batch_size 4 --max_steps 20 --eval_interval 10
          --eval_batches 2 --sample_tokens 20)
fi
for seed in ${SEEDS:-1337}; do
  out=$RES/seed_$seed
  mkdir -p "$out"
  "$PY" -c 'import torch; print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' \
    | tee "$out/train_log.txt"
  start=$SECONDS
  "$PY" -m gpt2fit.cli train shakespeare-char --prepare_from "$TEXT" --data_dir "$WORK/data" \
    --out_dir "$WORK/run_$seed" --seed "$seed" --report_to none "${extra[@]}" 2>&1 \
    | tr '\r' '\n' | grep -v '^train: ' | tee -a "$out/train_log.txt"
  echo "wall_time_s: $((SECONDS - start))" | tee -a "$out/train_log.txt"
  # every val token once, in windows of the model's n_positions (the recipe's block size)
  "$PY" -m gpt2fit.cli eval "$WORK/run_$seed" --data_dir "$WORK/data" --batch_size 64 \
    --output "$out/eval_full_val.json" 2>&1 | tr '\r' '\n' | grep -v 'it/s\]$' | tee "$out/eval_full_val.txt"
  cp "$WORK/run_$seed"/{summary.json,metrics.jsonl,config.yaml} "$out/"
  "$PY" - "$out/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
print(f"seed done: best val loss {s['best_val_loss']:.4f} (recipe's 200-batch eval; nanoGPT 1.4697), "
      f"final {s['final_val_loss']:.4f}, {s['wall_time_s']:.0f} s on {s['device']}")
PY
done
