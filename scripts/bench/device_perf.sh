#!/usr/bin/env bash
# One device call for the step-performance work (issues #21, #26): GLM-5 layers, profile, MoE experts
# Stages in order, each under its own timeout; logs and JSON under $OUT (<= 8 files); a summary last.
#   source .whl/prelude.sh && bash scripts/bench/device_perf.sh [glm5] [profile] [moe]
# Stages (all three when none is named; ~300 s on an H100, <= 350 s by the timeouts):
#   glm5     scripts/bench/bench_glm5_layers.py: GLM-5-dims layers, 32K and 128K, warm-up and
#            sparse, freq 4 vs all-Full, with a kernel-family profile of the 32K freq 4 cells
#   profile  scripts/bench/profile_step.py: the bench model's sparse and warm-up step at 32K and
#            128K by kernel family (PROFILE_ARGS=--memory adds the allocator peak)
#   moe      scripts/bench/bench_moe_experts.py: SequentialMLP vs grouped GEMMs, GLM-5 expert dims
#   glm5_base  the glm5 stage on the package in $BASELINE (an unpacked older tree, e.g.
#            `git archive 663449d | tar -x -C .baseline`, data/ included: the old config
#            validation loads data/default's tokenizer), with this tree's FLOP model, into
#            $OUT/base: before/after from one call (not in the default set; ~150 s more)
set -u
OUT=${OUT:-outputs/perf}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# Extra options per stage, split on spaces: GLM5_ARGS, PROFILE_ARGS, MOE_ARGS.
read -r -a glm5_args <<< "${GLM5_ARGS:-}"
read -r -a profile_args <<< "${PROFILE_ARGS:-}"
read -r -a moe_args <<< "${MOE_ARGS:-}"
stages=("$@")
[ ${#stages[@]} = 0 ] && stages=(glm5 profile moe)
for stage in "${stages[@]}"; do  # refuse a typo before any stage runs
  case $stage in
    glm5|profile|moe) ;;
    glm5_base)
      [ -f "${BASELINE:-}/indexcache_train/__init__.py" ] || {
        echo "glm5_base: set BASELINE to an unpacked older tree (no indexcache_train in '${BASELINE:-}')"
        exit 2
      }
      # The old config validation loads the bundled tokenizer: a tree unpacked without data/
      # fails only after the device call has started.
      [ -f "$BASELINE/data/default/gpt2.tiktoken" ] || {
        echo "glm5_base: $BASELINE has no data/default/gpt2.tiktoken (the old config validation loads it): unpack the whole tree, e.g. git archive 663449d | tar -x -C $BASELINE"
        exit 2
      } ;;
    *) echo "unknown stage $stage (glm5, glm5_base, profile, moe)"; exit 2 ;;
  esac
done
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# shellcheck source=scripts/bench/_stage.sh
source "$(dirname "$0")/_stage.sh"
for stage in "${stages[@]}"; do
  case $stage in
    glm5)
      run glm5 "${T_GLM5:-160}" python3 scripts/bench/bench_glm5_layers.py --out "$OUT" \
        --budget-s "${GLM5_BUDGET:-140}" "${glm5_args[@]}" ;;
    profile)
      run profile "${T_PROFILE:-130}" python3 scripts/bench/profile_step.py --out "$OUT" \
        "${profile_args[@]}" ;;
    glm5_base)
      run glm5_base "${T_GLM5:-160}" env PYTHONPATH="$BASELINE${PYTHONPATH:+:$PYTHONPATH}" \
        python3 scripts/bench/bench_glm5_layers.py --out "$OUT/base" \
        --budget-s "${GLM5_BUDGET:-140}" "${glm5_args[@]}" ;;
    moe)
      run moe "${T_MOE:-60}" python3 scripts/bench/bench_moe_experts.py --out "$OUT" "${moe_args[@]}" ;;
  esac
done
echo "=== summary"
for f in "$OUT/glm5_layers.json" "$OUT/base/glm5_layers.json"; do
  [ -f "$f" ] && echo "--- $f" && python3 scripts/bench/bench_glm5_layers.py --render "$f"
done
[ -f "$OUT/profile.log" ] && grep -h -B2 -A12 "time by family |" "$OUT/profile.log"
[ -f "$OUT/moe.log" ] && grep -h -B8 "rule (>" "$OUT/moe.log"
exit 0
