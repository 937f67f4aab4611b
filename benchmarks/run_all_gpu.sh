#!/usr/bin/env bash
# Every row of benchmarks/RESULTS.md on one GPU: JSON records + logs under benchmarks/logs/.
#
#   bash benchmarks/run_all_gpu.sh [GROUP_OR_ROW ...]      (default: all)
#   DRY_RUN=1 bash benchmarks/run_all_gpu.sh first         (print the plan, run nothing)
#
# Groups, in the order `all` runs them (a row already run by this invocation is not run again):
#   first      the rows that matter first, sized for ONE device call of under 10 minutes with every
#              compilation included: 64x64 DDIM-25 guided and unguided (batch 256), 256x256
#              DDIM-25 guided (batch 32), the 64x64 diffusion training step (batch 64). Row limits
#              150 + 100 + 160 + 110 = 520 s, plus at most 20 s for the device probe and 20 s for
#              the summary: 560 s. The limits are budgets, not measurements: the script prints
#              what each row and the group took, to set them from.
#   ops        the XLA probe (matmul peak, conv / GN blocks, attention xla vs cudnn)
#   sample64   64x64: DDIM25 unguided, DDIM25 guided, DDPM 25 guided, DPM-Solver++ 2M 20 guided
#              (batch 256)
#   sample256  256x256: DDIM25 guided, DDIM25 unguided, DPM-Solver++ 2M 20 guided (batch 32)
#   The solver rows run the released configs' DPM-Solver++ command (sample.sampler=dpm_solver,
#   dpmsolver++, order 2, 20 steps, time_uniform, dynamic thresholding): one UNet forward and one
#   guidance gradient per step, as DDIM, so their ms per step sit beside the DDIM25 rows'.
#   attn       64x64 DDIM25 unguided with XLA attention (the ablation of --attention auto)
#   train      one AdamW step: 64/256 diffusion and classifier at the reference's batches
#   remat      the 256x256 diffusion step at 32 per device (the reference's batch 256 on 8 GPUs)
#              under model.remat dots and full: step time and peak memory of each policy
#   all        all of the above, in that order
#   solver     the two DPM-Solver++ rows alone (64x64 and 256x256, limits 150 + 160 s, one call;
#              they are also in sample64 / sample256): run after `first` for the DDIM25 guided
#              rows beside them on the same GPU
#   guidance   guidance intervals' saving (not part of `all`): 64x64 DDIM25 classifier-guided in
#              sigma (0.28, 5.42] (beside s64_ddim25_guided), 256x256 DDIM25 two-network guidance
#              (w 2; a second random UNet as the guide) at every step and in that interval
#   cpu        tiny stand-ins that run anywhere in seconds (not part of `all`)
# A row name (e.g. s64_ddim25_guided) runs that row alone. Rows outside `first` and `solver` are
# limited to ROW_TIMEOUT each and their groups are not sized to one call: give each its own call
# (or its rows one by one) and size them from the times printed.
#
# Environment: PYTHON (default python3: the GPU image's interpreter already has jax[cuda], flax,
# optax, numpy, pillow and scikit-learn, which is all the benchmarks import: no ml_collections,
# clu or TensorFlow, so no wheels need carrying), LOGS (default benchmarks/logs), ROW_TIMEOUT seconds (default 540: the
# limit of a row outside `first` and `solver`), TIMEOUT_<row> seconds (one row's limit, e.g. TIMEOUT_ops=300).
# When $OUT is set (the device tool), each row's JSON and log are copied there the moment the row
# ends, so a later row that fails or overruns the call loses nothing already measured.
# Afterwards: python benchmarks/common.py benchmarks/logs/*.json prints the tables for RESULTS.md.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${LOGS:-benchmarks/logs}
ROW_TIMEOUT=${ROW_TIMEOUT:-540}
export PYTHONUNBUFFERED=1

declare -A ROWS=(
  [ops]="bench_ops.py --batch 256"
  [s64_ddim25_unguided]="bench_sampling.py --config 64 --batch 256 --respacing ddim25 --repeats 2"
  [s64_ddim25_guided]="bench_sampling.py --config 64 --batch 256 --respacing ddim25 --guided --repeats 2"
  [s64_ddpm25_guided]="bench_sampling.py --config 64 --batch 256 --respacing 25 --guided --repeats 2"
  [s64_dpm20_guided]="bench_sampling.py --config 64 --batch 256 --sampler dpm_solver --nfe 20 --thresholding --guided --repeats 2"
  [s256_ddim25_guided]="bench_sampling.py --config 256 --batch 32 --respacing ddim25 --guided --repeats 2"
  [s256_ddim25_unguided]="bench_sampling.py --config 256 --batch 32 --respacing ddim25 --repeats 2"
  [s256_dpm20_guided]="bench_sampling.py --config 256 --batch 32 --sampler dpm_solver --nfe 20 --thresholding --guided --repeats 2"
  [s64_ddim25_unguided_xla]="bench_sampling.py --config 64 --batch 256 --respacing ddim25 --attention xla --repeats 2"
  [t_diffusion_64]="bench_training.py --kind diffusion --config 64 --batch 64"
  [t_classifier_64]="bench_training.py --kind classifier --config 64 --batch 128"
  [t_diffusion_256]="bench_training.py --kind diffusion --config 256 --batch 16"
  [t_classifier_256]="bench_training.py --kind classifier --config 256 --batch 64"
  [t_diffusion_256_b32_dots]="bench_training.py --kind diffusion --config 256 --batch 32 --remat dots"
  [t_diffusion_256_b32_full]="bench_training.py --kind diffusion --config 256 --batch 32 --remat full"
  [s64_ddim25_guided_interval]="bench_sampling.py --config 64 --batch 256 --respacing ddim25 --guided --interval 0.28,5.42 --repeats 2"
  [s256_ddim25_two_network]="bench_sampling.py --config 256 --batch 32 --respacing ddim25 --guide-network --weight 2 --repeats 2"
  [s256_ddim25_two_network_interval]="bench_sampling.py --config 256 --batch 32 --respacing ddim25 --guide-network --weight 2 --interval 0.28,5.42 --repeats 2"
  [s_tiny]="bench_sampling.py --tiny --guided --respacing ddim2 --dtype float32 --batch 4"
  [s_tiny_interval]="bench_sampling.py --tiny --guide-network --interval 0.3,5 --respacing ddim4 --dtype float32 --batch 4"
  [s_tiny_dpm]="bench_sampling.py --tiny --guided --sampler dpm_solver --nfe 2 --dtype float32 --batch 4"
  [t_tiny]="bench_training.py --tiny --kind diffusion --dtype float32 --batch 4 --warmup 1 --steps 2"
)
# The rows of `first` and `solver` carry their own limits (their sums are the groups' budgets
# above).
declare -A LIMITS=(
  [s64_ddim25_guided]=150
  [s64_ddim25_unguided]=100
  [s256_ddim25_guided]=160
  [t_diffusion_64]=110
  [s64_dpm20_guided]=150
  [s256_dpm20_guided]=160
  [s_tiny]=120
  [s_tiny_dpm]=120
  [s_tiny_interval]=120
  [t_tiny]=120
)
declare -A SETS=(
  [first]="s64_ddim25_guided s64_ddim25_unguided s256_ddim25_guided t_diffusion_64"
  [ops]="ops"
  [sample64]="s64_ddim25_unguided s64_ddim25_guided s64_ddpm25_guided s64_dpm20_guided"
  [sample256]="s256_ddim25_guided s256_ddim25_unguided s256_dpm20_guided"
  [attn]="s64_ddim25_unguided_xla"
  [train]="t_diffusion_64 t_classifier_64 t_diffusion_256 t_classifier_256"
  [remat]="t_diffusion_256_b32_dots t_diffusion_256_b32_full"
  [solver]="s64_dpm20_guided s256_dpm20_guided"
  [guidance]="s64_ddim25_guided_interval s256_ddim25_two_network s256_ddim25_two_network_interval"
  [cpu]="t_tiny s_tiny s_tiny_dpm s_tiny_interval"
)
ALL="first ops sample64 sample256 attn train remat"

row_limit() {
  local override="TIMEOUT_$1"
  echo "${!override:-${LIMITS[$1]:-$ROW_TIMEOUT}}"
}

copy_out() {
  # Called after every row, whatever its outcome.
  [[ -n "${OUT:-}" ]] || return 0
  local f
  for f in "$@"; do
    [[ -f "$f" ]] && cp "$f" "$OUT/"
  done
  return 0
}

# The plan: the groups (or single rows) asked for, in order, `all` expanded.
plan=()
for arg in "${@:-all}"; do
  if [[ "$arg" == all ]]; then
    read -r -a names <<<"$ALL"
    plan+=("${names[@]}")
  elif [[ -n "${SETS[$arg]:-}" || -n "${ROWS[$arg]:-}" ]]; then
    plan+=("$arg")
  else
    echo "unknown group or row: $arg (groups: all ${!SETS[*]}; rows: ${!ROWS[*]})" >&2
    exit 2
  fi
done

mkdir -p "$LOGS"
[[ -z "${OUT:-}" ]] || mkdir -p "$OUT"
if [[ -z "${DRY_RUN:-}" ]]; then
  : >"$LOGS/timings.log"
  timeout 20 "$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 |
    tee "$LOGS/devices.log"
  copy_out "$LOGS/devices.log"
fi

declare -A DONE=()
failed=()
run_row() {
  local name=$1 limit start status
  limit=$(row_limit "$name")
  read -r -a cmd <<<"${ROWS[$name]}"
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "row $name limit $limit s: ${cmd[*]}"
    return
  fi
  echo "=== $name (limit $limit s): ${cmd[*]}"
  # A record left by an earlier invocation must not pass for this one's.
  rm -f "$LOGS/$name.json"
  start=$(date +%s)
  timeout "$limit" "$PY" "benchmarks/${cmd[0]}" "${cmd[@]:1}" --out "$LOGS/$name.json" \
    >"$LOGS/$name.log" 2>&1
  status=$?
  tail -n 3 "$LOGS/$name.log"
  local verdict="exit $status"
  [[ $status -eq 124 ]] && verdict="timed out (limit $limit s)"
  echo "=== $name: $verdict after $(($(date +%s) - start)) s" | tee -a "$LOGS/timings.log"
  copy_out "$LOGS/$name.json" "$LOGS/$name.log" "$LOGS/timings.log"
  [[ $status -eq 0 ]] || failed+=("$name")
}

for group in "${plan[@]}"; do
  read -r -a rows <<<"${SETS[$group]:-$group}"
  group_start=$(date +%s)
  budget=0
  ran=0
  for name in "${rows[@]}"; do
    [[ -z "${DONE[$name]:-}" ]] || continue
    DONE[$name]=1
    budget=$((budget + $(row_limit "$name")))
    ran=$((ran + 1))
    run_row "$name"
  done
  if [[ -n "${DRY_RUN:-}" ]]; then
    echo "group $group: $ran row(s), limits sum $budget s"
  else
    echo "=== group $group: $ran row(s) in $(($(date +%s) - group_start)) s (limits sum $budget s)" |
      tee -a "$LOGS/timings.log"
    copy_out "$LOGS/timings.log"
  fi
done
[[ -z "${DRY_RUN:-}" ]] || exit 0

shopt -s nullglob
records=("$LOGS"/*.json)
if ((${#records[@]})); then
  timeout 20 "$PY" benchmarks/common.py "${records[@]}" | tee "$LOGS/summary.md"
  copy_out "$LOGS/summary.md"
fi
if ((${#failed[@]})); then
  echo "failed rows: ${failed[*]}" >&2
  exit 1
fi
