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
    tune|tune2|tune3) # TUNE_ARGS (tune2: TUNE2_ARGS, tune3: TUNE3_ARGS), e.g. "--loss siglip" or "--dtypes float32 --precision ieee"
      args=${TUNE_ARGS:-}; [ $step = tune2 ] && args=${TUNE2_ARGS:-}; [ $step = tune3 ] && args=${TUNE3_ARGS:-}
      timeout ${TUNE_S:-150} python3 benchmarks/tune_tiles.py --dtypes bfloat16 \
            --stage ${TUNE_STAGE:-both} $args > "$OUT/$step.txt" 2>&1; grep -v "^  " "$OUT/$step.txt" | tail -40 ;;
    bench|bench2) # bench2: a second set (SIZES2, METHODS2, D2, BIG2) in the same call
      # copies: bench2's settings must not leak into a later bench step
      sizes=${SIZES:-1024 2048 4096 8192 16384 65536} methods=${METHODS:-infcl_inf infcl_inf_1dir naive_loss naive_compiled}
      d=${D:-512} big=${BIG:-}
      if [ $step = bench2 ]; then sizes=${SIZES2:-$sizes}; methods=${METHODS2:-$methods}; d=${D2:-512}; big=${BIG2:-}; fi
      timeout ${BENCH_S:-240} python3 benchmarks/bench_loss.py --out "$OUT/$step" \
             ${big:---no-big} --d $d --sizes $sizes --dtypes ${DTYPES:-bfloat16} --methods $methods \
             > "$OUT/$step.txt" 2>&1; sed -n '/^wrote/,$p' "$OUT/$step.txt" ;;
    train) timeout ${TRAIN_S:-300} python3 benchmarks/bench_train.py --out "$OUT" ${TRAIN_ARGS:-} \
             > "$OUT/train.txt" 2>&1; sed -n '/^wrote/,$p' "$OUT/train.txt"; tail -3 "$OUT/train.txt" ;;
    profile) # PROFILES: B:D:loss items (loss clip or siglip)
      for item in ${PROFILES:-2048:512:clip 8192:512:clip}; do IFS=: read -r b d l <<< "$item"
        timeout 90 python3 benchmarks/profile_small.py --b $b --d $d --loss $l --steps ${PROFILE_STEPS:-20} \
               > "$OUT/profile_${b}_${d}_$l.txt" 2>&1; grep "^B=" "$OUT/profile_${b}_${d}_$l.txt"; done ;;
    host) # HOST_ARGS items B:D:profile (profile clip, siglip or none)
      for item in ${HOST_ARGS:-256:64:clip 4096:512:siglip}; do IFS=: read -r b d l <<< "$item"
        timeout 120 python3 benchmarks/host_time.py --b $b --d $d --profile $l \
               > "$OUT/host_${b}_${d}.txt" 2>&1; grep " us " "$OUT/host_${b}_${d}.txt"; done ;;
    lab) timeout ${LAB_S:-280} python3 benchmarks/kernel_lab.py --out "$OUT" ${LAB_ARGS:-} \
           > "$OUT/lab.txt" 2>&1; cat "$OUT/lab.txt" | grep -v "^ " | tail -60 ;;
    *) echo "unknown step $step" ;;
  esac
  echo "== $step took $(( $(date +%s) - t0 )) s"
done
