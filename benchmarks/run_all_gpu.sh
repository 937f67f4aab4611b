#!/usr/bin/env bash
# Every row of benchmarks/RESULTS.md on one GPU: JSON records + logs under benchmarks/logs/.
#
#   bash benchmarks/run_all_gpu.sh [GROUP_OR_ROW ...]      (default: all)
#
# Groups (each fits one 10-minute device call on an H100; compile included):
#   ops        the XLA probe (matmul peak, conv / GN blocks, attention xla vs cudnn)
#   sample64   64x64: DDIM25 unguided, DDIM25 guided, DDPM 25 guided (batch 256)
#   sample256  256x256: DDIM25 guided, DDIM25 unguided (batch 32)
#   attn       64x64 DDIM25 unguided with XLA attention (the ablation of --attention auto)
#   train      one AdamW step: 64/256 diffusion and classifier at the reference's batches
#   all        all of the above, in that order
# A row name (e.g. s64_ddim25_guided) runs that row alone.
#
# Environment: PYTHON (default python3: the GPU image's interpreter already has jax[cuda], flax,
# optax and numpy, which is all the benchmarks import: no ml_collections, clu or TensorFlow, so
# no wheels need carrying), LOGS (default benchmarks/logs), ROW_TIMEOUT seconds (default 540).
# When $OUT is set (the device tool), the logs are also packed into $OUT/bench_logs.tgz.
# Afterwards: python benchmarks/common.py benchmarks/logs/*.json prints the tables for RESULTS.md.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${LOGS:-benchmarks/logs}
ROW_TIMEOUT=${ROW_TIMEOUT:-540}
export PYTHONUNBUFFERED=1
mkdir -p "$LOGS"

declare -A ROWS=(
  [ops]="bench_ops.py --batch 256"
  [s64_ddim25_unguided]="bench_sampling.py --config 64 --batch 256 --respacing ddim25 --repeats 2"
  [s64_ddim25_guided]="bench_sampling.py --config 64 --batch 256 --respacing ddim25 --guided --repeats 2"
  [s64_ddpm25_guided]="bench_sampling.py --config 64 --batch 256 --respacing 25 --guided --repeats 2"
  [s256_ddim25_guided]="bench_sampling.py --config 256 --batch 32 --respacing ddim25 --guided --repeats 2"
  [s256_ddim25_unguided]="bench_sampling.py --config 256 --batch 32 --respacing ddim25 --repeats 2"
  [s64_ddim25_unguided_xla]="bench_sampling.py --config 64 --batch 256 --respacing ddim25 --attention xla --repeats 2"
  [t_diffusion_64]="bench_training.py --kind diffusion --config 64 --batch 64"
  [t_classifier_64]="bench_training.py --kind classifier --config 64 --batch 128"
  [t_diffusion_256]="bench_training.py --kind diffusion --config 256 --batch 16"
  [t_classifier_256]="bench_training.py --kind classifier --config 256 --batch 64"
)
declare -A SETS=(
  [ops]="ops"
  [sample64]="s64_ddim25_unguided s64_ddim25_guided s64_ddpm25_guided"
  [sample256]="s256_ddim25_guided s256_ddim25_unguided"
  [attn]="s64_ddim25_unguided_xla"
  [train]="t_diffusion_64 t_classifier_64 t_diffusion_256 t_classifier_256"
)
SETS[all]="${SETS[ops]} ${SETS[sample64]} ${SETS[sample256]} ${SETS[attn]} ${SETS[train]}"

selected=()
for arg in "${@:-all}"; do
  if [[ -n "${SETS[$arg]:-}" ]]; then
    read -r -a names <<<"${SETS[$arg]}"
    selected+=("${names[@]}")
  elif [[ -n "${ROWS[$arg]:-}" ]]; then
    selected+=("$arg")
  else
    echo "unknown group or row: $arg (groups: ${!SETS[*]}; rows: ${!ROWS[*]})" >&2
    exit 2
  fi
done

"$PY" -c 'import jax; print("jax", jax.__version__, jax.devices())' 2>&1 | tee "$LOGS/devices.log"
failed=()
for name in "${selected[@]}"; do
  read -r -a cmd <<<"${ROWS[$name]}"
  echo "=== $name: ${cmd[*]}"
  start=$(date +%s)
  timeout "$ROW_TIMEOUT" "$PY" "benchmarks/${cmd[0]}" "${cmd[@]:1}" --out "$LOGS/$name.json" \
    >"$LOGS/$name.log" 2>&1
  status=$?
  tail -n 3 "$LOGS/$name.log"
  echo "=== $name: exit $status after $(( $(date +%s) - start )) s"
  [[ $status -eq 0 ]] || failed+=("$name")
done

shopt -s nullglob
records=("$LOGS"/*.json)
if (( ${#records[@]} )); then
  "$PY" benchmarks/common.py "${records[@]}" | tee "$LOGS/summary.md"
fi
if [[ -n "${OUT:-}" ]]; then
  tar czf "$OUT/bench_logs.tgz" "$LOGS"
fi
if (( ${#failed[@]} )); then
  echo "failed rows: ${failed[*]}" >&2
  exit 1
fi
