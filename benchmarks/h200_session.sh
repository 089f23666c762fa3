#!/usr/bin/env bash
# One device call: install the carried wheels, then the steps named in $STEPS (default: all),
# each under its own time limit, logs under $OUT. Run on the GPU machine from the repo root:
#   INFCL_COMMIT=<hash> STEPS="gpu_inf tune bench" bash benchmarks/h200_session.sh
# The device's copy of the tree may carry a stale git HEAD: INFCL_COMMIT names the commit the
# CSVs record (harness.commit). The wheels: `pip download --no-deps -d .whl beartype jaxtyping
# wadler-lindig hypothesis sortedcontainers einops` here, carried as ".whl".
set -uo pipefail
export PYTHONPATH=$PWD:$PWD/benchmarks${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install --no-deps --no-index -q .whl/*.whl 2>&1 | tail -2
STEPS=${STEPS:-"gpu_inf tune bench profile"}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for step in $STEPS; do
  t0=$(date +%s)
  case $step in
    gpu_inf) timeout 240 python3 -m pytest -q -x -p no:cacheprovider tests/test_inf.py -m gpu \
               > "$OUT/gpu_inf.txt" 2>&1; tail -4 "$OUT/gpu_inf.txt" ;;
    gpu_all) timeout ${GPU_ALL_S:-420} python3 -m pytest -q -p no:cacheprovider tests -m gpu \
               ${PYTEST_N:+-n $PYTEST_N} ${PYTEST_ARGS:-} > "$OUT/gpu_all.txt" 2>&1; tail -15 "$OUT/gpu_all.txt" ;;
    precision) timeout ${PRECISION_S:-150} python3 benchmarks/bench_precision.py --out "$OUT" \
                 > "$OUT/precision.txt" 2>&1; sed -n '/^wrote/,$p' "$OUT/precision.txt" ;;
    tune) timeout ${TUNE_S:-150} python3 benchmarks/tune_tiles.py --dtypes bfloat16 \
            --stage ${TUNE_STAGE:-both} > "$OUT/tune.txt" 2>&1; grep -v "^  " "$OUT/tune.txt" | tail -40 ;;
    bench|bench2) # bench2: a second set (SIZES2, METHODS2, D2, BIG2) in the same call
      if [ $step = bench2 ]; then SIZES=${SIZES2:-$SIZES}; METHODS=${METHODS2:-$METHODS}; D=${D2:-512}; BIG=${BIG2:-}; fi
      timeout ${BENCH_S:-240} python3 benchmarks/bench_loss.py --out "$OUT/$step" \
             ${BIG:---no-big} --d ${D:-512} \
             --sizes ${SIZES:-1024 2048 4096 8192 16384 65536} --dtypes ${DTYPES:-bfloat16} \
             --methods ${METHODS:-infcl_inf infcl_inf_1dir naive_loss naive_compiled} \
             > "$OUT/$step.txt" 2>&1; sed -n '/^wrote/,$p' "$OUT/$step.txt" ;;
    train) timeout ${TRAIN_S:-300} python3 benchmarks/bench_train.py --out "$OUT" ${TRAIN_ARGS:-} \
             > "$OUT/train.txt" 2>&1; sed -n '/^wrote/,$p' "$OUT/train.txt"; tail -3 "$OUT/train.txt" ;;
    profile) for b in 2048 8192; do timeout 60 python3 benchmarks/profile_small.py --b $b \
               > "$OUT/profile_$b.txt" 2>&1; grep "^B=" "$OUT/profile_$b.txt"; done ;;
    *) echo "unknown step $step" ;;
  esac
  echo "== $step took $(( $(date +%s) - t0 )) s"
done
