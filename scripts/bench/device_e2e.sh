#!/usr/bin/env bash
# One device call for the end-to-end GPU work (issue #12): stages run in order, logs under $OUT.
#   source .whl/prelude.sh && bash scripts/bench/device_e2e.sh gputests bench real
# Stages:
#   gputests  all GPU tests (kernels, distillation kernels, the trainer on one GPU)
#   bench     train-step sweep (all-Full / freq2 / freq4 x 8K-128K) and the single-layer anchor
#   real      corpus-v1 at 8K: plain-DSA pretraining, then freq 4 warm-up + sparse (needs .devdata)
set -u
OUT=${OUT:-outputs/e2e}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CORPUS_V1_DIR=${CORPUS_V1_DIR:-.devdata/corpus_v1}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run() {  # run NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "$t" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  grep -v "^\[rank\|warn" "$OUT/$name.log" | tail -n "${TAIL:-40}"
  echo "=== $name done in $((SECONDS - t0)) s (rc $rc)"
}
for stage in "$@"; do
  case $stage in
    gputests)
      run gputests "${T_TESTS:-420}" python3 -m pytest tests/gpu -p no:cacheprovider -q -rA --durations=5 ;;
    bench)
      run train_step "${T_BENCH:-420}" python3 scripts/bench/bench_train_step.py --out "$OUT"
      run dsa_layer 120 python3 scripts/bench/bench_dsa_layer.py --out "$OUT" ;;
    real)
      run pretrain 300 python3 train.py +experiment=corpus_v1_pretrain run.root=runs/e2e
      # The `latest` pointer names only a complete checkpoint (never a half-written temp dir).
      cks=runs/e2e/corpus_v1_pretrain-local/checkpoints
      ck=$cks/$(cat "$cks/latest")
      run indexcache 300 python3 train.py +experiment=corpus_v1_indexcache run.root=runs/e2e \
        checkpoint.load_pretrained="$ck"
      cat runs/e2e/corpus_v1_pretrain-local/metrics.jsonl runs/e2e/corpus_v1_indexcache-local/metrics.jsonl \
        > "$OUT/real_metrics.jsonl" ;;
  esac
done
