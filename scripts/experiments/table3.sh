#!/usr/bin/env bash
# The Table-3 protocol (issue #24) on one GPU, one device call (<= 540 s) or two; report into $OUT.
#   source .whl/prelude.sh && bash scripts/experiments/table3.sh "$OUT"
# Two calls, the second within ~30 s of the first (a warm device keeps runs/table3):
#   A: bash scripts/experiments/table3.sh "$OUT" --stop-after base --base-steps D,S
#      (the base, its search and zero-step evaluations; budget 510 s; status "base only")
#   B: bash scripts/experiments/table3.sh "$OUT" --reuse-base --base-steps D,S --arm-steps W,S
#      (reuses A's base and analysis when its fingerprint matches, else says so and trains it)
# More calls (C, ...) reuse the base the same way with their own --seeds; merge their reports here:
#   python scripts/experiments/table3_merge.py --out merged OUT_B OUT_C
# Needs .devdata/corpus_v1 (or CORPUS_V1_DIR): python scripts/build_default_corpus.py
#   --full .devdata/corpus_v1 --max-train-tokens 8000000. Extra arguments go to table3.py
#   (--arm-steps W,S fixes the arm steps instead of sizing them to the budget; --arms, --seeds
#   select jobs; --overwrite is passed here, and with --reuse-base it keeps the base).
# Exit status: table3.py's (0 complete or base only, 3 partial, 2 refused, 1 error).
set -u
OUT=${1:-${OUT:-outputs/table3}}
shift $(($# > 0 ? 1 : 0))
export PYTHONUNBUFFERED=1 CORPUS_V1_DIR=${CORPUS_V1_DIR:-.devdata/corpus_v1}
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader || true
# The outer limit stops the driver with SIGTERM (it stops its jobs and writes what finished)
# well inside the device's 600 s per command.
timeout -s TERM "${T_TABLE3:-540}" python3 scripts/experiments/table3.py --out "$OUT" \
  --overwrite "$@"
rc=$?
if [ -f "$OUT/table.md" ]; then cat "$OUT/table.md"; fi
ls -l "$OUT"
exit "$rc"
