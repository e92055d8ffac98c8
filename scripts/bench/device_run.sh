#!/usr/bin/env bash
# One device call: the GPU kernel tests and/or benchmarks, each stage logged under $OUT.
#   bash scripts/bench/device_run.sh tests quick        (stages: tests quick full)
# Needs the carried megatron-core wheels for the stock-Megatron column: source .whl/prelude.sh first.
set -u
OUT=${OUT:-outputs/bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
run() {  # run NAME TIMEOUT CMD...
  local name=$1 t=$2; shift 2
  local t0=$SECONDS
  echo "=== $name: $*"
  timeout "$t" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v "^\[" | tail -n 60
  echo "=== $name done in $((SECONDS - t0)) s (rc ${PIPESTATUS[0]})"
}
for stage in "$@"; do
  case $stage in
    tests)
      run tests ${T_TESTS:-300} python3 -m pytest tests/gpu/test_kernels_indexer.py tests/gpu/test_kernels_dense_attention.py \
        tests/gpu/test_kernels_sparse_mla.py -p no:cacheprovider -v -s -rA --durations=8 ;;
    quick)
      run bench_sparse_quick 120 python3 scripts/bench/bench_sparse_mla.py --seqs 4096,16384 --megatron-max 4096 --compare-bwd
      run bench_dense_quick 100 python3 scripts/bench/bench_dense_attention.py --seqs 8192,32768 --eff-max 8192
      run bench_indexer_quick 70 python3 scripts/bench/bench_indexer.py --seqs 8192,32768 --ref-max 8192 ;;
    full1)
      run bench_indexer 150 python3 scripts/bench/bench_indexer.py
      run bench_sparse_h64 200 python3 scripts/bench/bench_sparse_mla.py --heads 64 --megatron-max 16384 ;;
    full2)
      run bench_indexer 100 python3 scripts/bench/bench_indexer.py --ref-max 32768
      run bench_dense_qk192 170 python3 scripts/bench/bench_dense_attention.py --qk 192 --v 128
      run bench_dense_qk256 110 python3 scripts/bench/bench_dense_attention.py --qk 256 --v 256 --seqs 4096,16384,65536
      run bench_sparse_h128 120 python3 scripts/bench/bench_sparse_mla.py --heads 128 --seqs 4096,16384,65536 --megatron-max 8192
      run bench_indexer_h64 70 python3 scripts/bench/bench_indexer.py --heads 64 --seqs 8192,32768,131072 --ref-max 0 ;;
  esac
done
