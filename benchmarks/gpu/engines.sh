#!/usr/bin/env bash
# Accelerate's engines on one GPU, one process each (issue #16): train 20 steps with a checkpoint at
# 10, drop the last checkpoint and final/, --resume auto, then load final/ with transformers. Then
# the GPT-2 XL full finetune shape under a 12 GiB cap with ZeRO-3 + CPU offload and FSDP2 + offload
# (5 steps; metrics.jsonl's peak_mem_bytes is the measured figure). Needs the deepspeed wheel in
# .whl/ (bash ../shared/gpu/fetch-wheels.sh deepspeed==0.19.8). Called by run_all.sh's `engines`
# part: bash benchmarks/gpu/engines.sh RAW_DIR LOG; SMOKE=1 runs ZeRO-3 offload only, tiny, on a CPU.
set -uo pipefail
RAW=$1 LOG=$2 PY=${PYTHON:-python3}
data=$RAW/stdlib-char
[[ -f $data/meta.json ]] || "$PY" -m gpt2fit.cli prepare --input stdlib --tokenizer char --split chars \
  --max_chars 5000000 --out_dir "$data" --quiet >>"$LOG" 2>&1
size=(--preset gpt2 --block_size 1024 --micro_batch_size 8)
configs=(deepspeed_zero2 deepspeed_zero3_offload fsdp2 fsdp2_offload)
if [[ ${SMOKE:-0} == 1 ]]; then
  size=(--n_layer 1 --n_head 2 --n_embd 32 --block_size 32 --micro_batch_size 4)
  configs=(deepspeed_zero3_offload)
fi
rc=0
for cfg in "${configs[@]}"; do
  out=$RAW/engine-$cfg
  t=("$PY" -m accelerate.commands.launch --config_file "accelerate_configs/$cfg.yaml" --num_processes 1
     --main_process_port 29555 scripts/train.py --data_dir "$data" --out_dir "$out" "${size[@]}"
     --grad_accum_steps 2 --max_steps 20 --checkpoint_interval 10 --eval_interval 10 --eval_batches 4
     --log_interval 1 --report_to none)
  if "${t[@]}" >>"$LOG" 2>&1 && rm -rf "$out/checkpoints/step_00000020" "$out/final" \
      && "${t[@]}" --resume auto >>"$LOG" 2>&1 \
      && "$PY" -c "import sys; from transformers import AutoModelForCausalLM as M; M.from_pretrained(sys.argv[1])" \
         "$out/final" >>"$LOG" 2>&1; then
    echo "engine $cfg: trained, resumed, final/ loads; last rows:"
  else
    echo "engine $cfg: FAILED (see the log)"
    rc=1
  fi
  tail -n 2 "$out/metrics.jsonl" 2>/dev/null
done
[[ ${SMOKE:-0} == 1 ]] && exit $rc
# GPT-2 XL (1.56B) full finetune shape on a 12 GiB cap: random weights (no Hub on the GPU host)
for cfg in deepspeed_zero3_offload fsdp2_offload; do
  out=$RAW/xl-$cfg
  if "$PY" -m accelerate.commands.launch --config_file "accelerate_configs/$cfg.yaml" --num_processes 1 \
      --main_process_port 29556 scripts/train.py --data_dir "$data" --out_dir "$out" --preset gpt2-xl \
      --block_size 1024 --micro_batch_size 1 --grad_accum_steps 1 --grad_checkpointing true --loss_chunk_size 4096 \
      --max_memory 12GiB --max_steps 5 --eval_interval 5 --eval_batches 1 --log_interval 1 --report_to none \
      >>"$LOG" 2>&1; then
    echo "gpt2-xl $cfg under 12GiB: ran; peak_mem_bytes per step:"
    grep '"kind": "train"' "$out/metrics.jsonl" | sed 's/.*"peak_mem_bytes": \([0-9]*\).*/\1/' | tr '\n' ' '; echo
  else
    echo "gpt2-xl $cfg under 12GiB: FAILED (see the log)"
    rc=1
  fi
done
exit $rc
