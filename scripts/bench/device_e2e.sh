#!/usr/bin/env bash
# One device call for the end-to-end GPU work (issue #12): stages run in order, logs under $OUT.
#   source .whl/prelude.sh && bash scripts/bench/device_e2e.sh gputests bench real
# Stages:
#   gputests  all GPU tests (kernels, distillation kernels, the trainer on one GPU)
#   bench     train-step sweep (all-Full / freq2 / freq4 x 8K-128K) and the single-layer anchor
#   real      corpus-v1 at 8K: plain-DSA pretraining, then freq 4 warm-up + sparse (needs .devdata)
#   gputrain  only the trainer's GPU test (tests/gpu/test_train_gpu.py)
#   train1gpu train.py on one GPU (issue #7): the GPU toy, the ~1.2B bench model on corpus-v1 at
#             8K and at 32K (warm-up + sparse); per-stage table by scripts/bench/run_summary.py
#   parallel  scripts/bench/parallel_losses.py (issue #25): the LAYOUTS (default all; a layout
#             needing more GPUs than the machine has is reported not run) against one GPU, each
#             resumed under another layout, the planted bugs, throughput; needs .devdata. Jobs
#             persist in outputs/parallel: rc 4 = budget spent, run the same stage again
#   longctx   train-step sweep at 64K / 128K with the chunked LM head + loss (model.lm_loss_chunk)
set -u
OUT=${OUT:-outputs/e2e}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CORPUS_V1_DIR=${CORPUS_V1_DIR:-.devdata/corpus_v1}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# shellcheck source=scripts/bench/_stage.sh
source "$(dirname "$0")/_stage.sh"
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
    gputrain)
      run gputrain 240 python3 -m pytest tests/gpu/test_train_gpu.py -p no:cacheprovider -q -rA ;;
    train1gpu)
      run toy_gpu 120 python3 train.py +experiment=toy_gpu run.root=runs/t1
      run bench8k 240 python3 train.py +experiment=bench_glm5_corpus run.root=runs/t1 run.name=bench8k
      # A 1.2B checkpoint with its distributed-optimizer state is ~17 GB and each run saves two
      # (stage end, final): free the disk (64 GB) before the next run; metrics.jsonl stays.
      grep -h "saved " "$OUT/bench8k.log" | tail -n 2
      rm -rf runs/t1/bench8k-local/checkpoints
      run bench32k 240 python3 train.py +experiment=bench_glm5_corpus run.root=runs/t1 \
        run.name=bench32k model.seq_length=32768 optim.global_batch_size=1 \
        recipe.stages.0.steps=5 recipe.stages.1.steps=10 parallel.recompute_granularity=full \
        parallel.recompute_method=uniform parallel.recompute_num_layers=1
      grep -h "saved " "$OUT/bench32k.log" | tail -n 2
      rm -rf runs/t1/bench32k-local/checkpoints
      for r in toy_gpu bench8k bench32k; do cp "runs/t1/$r-local/metrics.jsonl" "$OUT/$r.metrics.jsonl"; done
      run summary 30 python3 scripts/bench/run_summary.py --json "$OUT/train1gpu.json" \
        runs/t1/toy_gpu-local/metrics.jsonl runs/t1/bench8k-local/metrics.jsonl \
        runs/t1/bench32k-local/metrics.jsonl ;;
    parallel)
      run parallel "${T_PARALLEL:-570}" python3 scripts/bench/parallel_losses.py \
        --out outputs/parallel --layouts "${LAYOUTS:-all}" --budget-s "${BUDGET_S:-400}" --reuse
      cp outputs/parallel/parallel_losses.json "$OUT/" 2>/dev/null
      for d in outputs/parallel/*/; do
        [ -f "$d/train.log" ] && tail -n 30 "$d/train.log" > "$OUT/parallel_$(basename "$d").log"
      done ;;
    longctx)
      run longctx "${T_LONG:-420}" python3 scripts/bench/bench_train_step.py --out "$OUT/longctx" \
        --schedules "${LONG_SCHEDULES:-freq4}" --seqs "${LONG_SEQS:-65536,131072}" --steps 2 \
        --set model.lm_loss_chunk="${LM_CHUNK:-8192}" ;;
  esac
done
