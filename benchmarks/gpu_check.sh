#!/usr/bin/env bash
# The GPU check of emacore, in one call: gpu-marked tests (torch, jax), the torch and jax
# benchmarks on the device, side_stream=True, CPU offload, CuPy through the array-API backend.
#
#   benchmarks/gpu_check.sh RESULTS_DIR [--device cpu|cuda]      (default: cuda)
#
# On a lent GPU machine (the `run` tool of /work/.library/device/README.md), call `run` with:
#   command:   bash benchmarks/gpu_check.sh "$OUT/gpu" --device cuda
#   carry:     ["dist/gpu-wheels"]
#   timeout_s: 540
# and leave `kind` out (an H100 is enough). The parts' time limits add up to 445 s (under 8
# minutes); a machine's start comes on top, so one call costs about 9 to 10 of the 15 minutes
# of device time: give the machine back (give_back) after it unless you rerun at once.
#
# Nothing is fetched there (no network). Before the call, fetch the wheels of what the GPU
# image may lack, here, into dist/gpu-wheels (ignored by git through dist/, so never committed;
# carried by name):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d dist/gpu-wheels \
#     "array-api-compat>=1.9" "pluggy>=1.3" "safetensors>=0.4" "hypothesis>=6.100" \
#     sortedcontainers attrs
# The script installs from there (--no-index, --no-deps, into a scratch folder put on
# PYTHONPATH) only the ones its python cannot import.
#
# RESULTS_DIR receives 7 files (the run tool brings back at most 8): summary.md (what ran, how
# it ended and how long it took, the device, its copy bandwidth, side_stream, offload, CuPy),
# torch.md and jax.md (the benchmark tables, as benchmarks/results/*.md), pytest-torch.xml and
# pytest-jax.xml (junit), pytest.log, gpu_check.log (everything the parts printed).
#
# Each part runs under `timeout`; a part that fails or times out is recorded and the next one
# runs; the script exits 1 if any part failed. It runs with its own python ($PYTHON, default
# python3: on the GPU machine the one that holds torch, jax and CuPy), never with nox.
# --device cpu runs every part on the CPU, with few repetitions and the jax gpu tests on
# jax's CPU device (EMACORE_TEST_GPU_PLATFORM=cpu), to check the script before a GPU call; the
# torch gpu tests then skip, with their reasons, in pytest.log.
set -uo pipefail

usage() { echo "usage: $0 RESULTS_DIR [--device cpu|cuda]" >&2; exit 2; }
[ $# -ge 1 ] || usage
RESULTS=$1
shift
DEVICE=cuda
while [ $# -gt 0 ]; do
  case $1 in
    --device) [ $# -ge 2 ] || usage; DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#--device=}; shift ;;
    *) usage ;;
  esac
done
case $DEVICE in cpu|cuda) ;; *) usage ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/dist/gpu-wheels}
mkdir -p "$RESULTS" || exit 2
RESULTS=$(cd "$RESULTS" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SITE=$WORK/site
export PYTHONPATH="$ROOT/src:$ROOT/benchmarks:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

if [ "$DEVICE" = cuda ]; then
  REPEAT=${GPU_CHECK_REPEAT:-25}
  SCALE=1
  export EMACORE_REQUIRE_GPU=1  # a gpu-marked test that would skip fails (tests/conftest.py)
  JAX_DEVICE=gpu
else
  REPEAT=${GPU_CHECK_REPEAT:-2}
  SCALE=4  # this CPU is slower than the GPU machine: looser limits, same parts
  unset EMACORE_REQUIRE_GPU
  export EMACORE_TEST_GPU_PLATFORM=cpu  # the jax gpu tests on jax's CPU device
  JAX_DEVICE=cpu
fi

LOG=$RESULTS/gpu_check.log
SUMMARY=$WORK/parts.md
: >"$LOG"
: >"$SUMMARY"
: >"$RESULTS/pytest.log"
STATUS_ROWS=()
FAILED=0
START=$SECONDS

# part NAME LIMIT_S OUTPUT_FILE COMMAND...: run COMMAND (a program, or a function of this
# script, run by a child bash) under `timeout`; its stdout is appended to OUTPUT_FILE and to the
# log, its stderr to the log; record how it ended
part() {
  local name=$1 limit=$(($2 * SCALE)) out=$3 t0=$SECONDS rc status
  shift 3
  if [ -n "${GPU_CHECK_MAX_LIMIT:-}" ] && [ "$limit" -gt "$GPU_CHECK_MAX_LIMIT" ]; then
    limit=$GPU_CHECK_MAX_LIMIT  # to see the time-outs recorded (a check of this script)
  fi
  echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG" >&2
  if [ "$(type -t "$1")" = function ]; then
    timeout --kill-after=10 "$limit" bash -c '"$@"' _ "$@" >"$WORK/part.out" 2>>"$LOG"
  else
    timeout --kill-after=10 "$limit" "$@" >"$WORK/part.out" 2>>"$LOG"
  fi
  rc=$?
  cat "$WORK/part.out" >>"$out"
  cat "$WORK/part.out" >>"$LOG"
  case $rc in
    0) status=ok ;;
    124|137) status="TIMED OUT after ${limit}s"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  echo "=== $name: $status in $((SECONDS - t0)) s" | tee -a "$LOG" >&2
  STATUS_ROWS+=("| $name | $status | $((SECONDS - t0)) |")
}

# shellcheck disable=SC2329  # run by `part`, through a child bash
install_missing() {
  local pairs="array_api_compat:array-api-compat pluggy:pluggy safetensors:safetensors"
  pairs="$pairs hypothesis:hypothesis sortedcontainers:sortedcontainers attr:attrs"
  local missing=() pair
  for pair in $pairs; do
    if ! "$PYTHON" -c "import ${pair%%:*}" 2>/dev/null; then
      missing+=("${pair#*:}")
    fi
  done
  if [ ${#missing[@]} -eq 0 ]; then
    echo "all present: nothing installed"
    return 0
  fi
  echo "missing: ${missing[*]}; installing from $WHEELS (--no-index)"
  "$PYTHON" -m pip install --no-index --no-deps --disable-pip-version-check --quiet \
    --find-links "$WHEELS" --target "$SITE" "${missing[@]}" || return 1
  for pair in $pairs; do
    "$PYTHON" -c "import ${pair%%:*}" || return 1
  done
  echo "installed: ${missing[*]}"
}

# pytest_run BACKEND: the gpu-marked tests of tests/BACKEND, junit and log into RESULTS
# shellcheck disable=SC2329  # run by `part`, through a child bash
pytest_run() {
  local backend=$1
  EMACORE_TEST_BACKENDS=$backend "$PYTHON" -m pytest -m gpu "tests/$backend" -p no:cacheprovider \
    --junitxml="$RESULTS/pytest-$backend.xml" >>"$RESULTS/pytest.log" 2>&1
  local rc=$?
  tail -n 15 "$RESULTS/pytest.log"
  return "$rc"
}

export -f install_missing pytest_run
export PYTHON WHEELS SITE RESULTS
command -v nvidia-smi >/dev/null && nvidia-smi -L >>"$LOG" 2>&1
echo "# gpu_check: --device $DEVICE, python $("$PYTHON" -c 'import sys; print(sys.version.split()[0])'), $(date -u +%FT%TZ)" >>"$LOG"

part install 45 "$WORK/install.txt" install_missing
part device 20 "$SUMMARY" env XLA_PYTHON_CLIENT_PREALLOCATE=false "$PYTHON" benchmarks/gpu_check.py device --device "$DEVICE" --repeat "$REPEAT"
part pytest-torch 60 "$WORK/pytest-torch.txt" pytest_run torch
part pytest-jax 60 "$WORK/pytest-jax.txt" pytest_run jax
part side-stream 30 "$SUMMARY" "$PYTHON" benchmarks/gpu_check.py side-stream --device "$DEVICE" --repeat "$REPEAT"
part offload 30 "$SUMMARY" "$PYTHON" benchmarks/gpu_check.py offload --device "$DEVICE" --repeat "$REPEAT"
part cupy 30 "$SUMMARY" "$PYTHON" benchmarks/gpu_check.py cupy --device "$DEVICE" --repeat "$REPEAT"
part bench-torch 120 "$WORK/bench-torch.txt" "$PYTHON" benchmarks/bench_torch.py --device "$DEVICE" \
  --repeat "$REPEAT" --markdown "$RESULTS/torch.md"
part bench-jax 100 "$WORK/bench-jax.txt" "$PYTHON" benchmarks/bench_jax.py --device "$JAX_DEVICE" \
  --repeat "$REPEAT" --markdown "$RESULTS/jax.md"

{
  echo "# gpu_check.sh --device $DEVICE"
  echo
  echo "- $(date -u +%FT%TZ); total $((SECONDS - START)) s; python $PYTHON; benchmark repetitions $REPEAT"
  echo "- packages: $(tr '\n' ' ' <"$WORK/install.txt" 2>/dev/null)"
  if [ "$DEVICE" = cpu ]; then
    echo "- **CPU dry run**: the torch gpu tests skip (reasons in pytest.log), the jax gpu tests"
    echo "  run on jax's CPU device, side_stream runs on recorded streams: no GPU number here"
  fi
  echo
  echo "| part | ended | seconds |"
  echo "|---|---|---:|"
  printf '%s\n' "${STATUS_ROWS[@]}"
  echo
  for backend in torch jax; do
    echo "- pytest -m gpu tests/$backend: $(grep -E '^(=+ )?[0-9]+ (passed|failed|skipped|error)|no tests ran' "$WORK/pytest-$backend.txt" 2>/dev/null | tail -n 1 | tr -d '=')"
  done
  echo
  cat "$SUMMARY"
  for bench in torch jax; do
    if [ -s "$RESULTS/$bench.md" ]; then
      echo "## $bench benchmark: share of the copy bandwidth (x copy), see $bench.md"
      echo
      echo "| set | method | median ms | x copy |"
      echo "|---|---|---:|---:|"
      awk -F'|' '/^\| set \| method \|/ {on = 1; next} /^$/ {on = 0}
        on && /^\| [a-z0-9-]+ \|/ {print "|" $2 "|" $3 "|" $4 "|" $8 "|"}' "$RESULTS/$bench.md"
      echo
    fi
  done
} >"$RESULTS/summary.md"

echo "gpu_check: $([ $FAILED = 0 ] && echo 'every part ok' || echo 'SOME PART FAILED') in $((SECONDS - START)) s; results in $RESULTS"
printf '%s\n' "${STATUS_ROWS[@]}"
exit $FAILED
