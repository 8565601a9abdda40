#!/usr/bin/env bash
# The one GPU run (../shared/notes/gpu-method.md): build the package (CUDA part included), run the tests on
# CUDA, then every benchmarks/bench_*.py with the peers in the same process. Tables and JSON go to $OUT
# (default benchmarks/results/), the log to $OUT/gpu_check.log; the markdown tables print last. PNG plots
# too where matplotlib is installed; else draw them here: python -m benchmarks.plot <the fetched .json files>.
# Usage, from the repository root on the GPU machine (no network): bash ../shared/tools/peer-wheels.sh here
# first, then `python3 -m pip download -q --no-deps --only-binary=:all: -d .whl pytest-xdist execnet` (parallel
# tests), carry .whl/, and name the commit (the device copy has no .git):
#   QLORA_KERNELS_COMMIT=<git rev-parse --short HEAD, run here> OUT=$OUT bash benchmarks/gpu_check.sh
set -uo pipefail
export OUT=${OUT:-benchmarks/results}
# PACK=1 (the device tool brings back at most 8 files from $OUT): everything is written to a work folder and
# packed into $OUT/gpu_check.tgz every 10 s and at the end, so a call cut at its limit still brings back all
# that was written up to ~10 s before (the rename keeps the last whole archive)
if [ "${PACK:-0}" = 1 ]; then
  dest=$OUT; export OUT=$HOME/gpu_out; rm -rf "$OUT"; mkdir -p "$OUT"
  # a temporary name per process (a killed packer's tar cannot write into the last archive); tar's status 1
  # (a log grew while read) still leaves a whole archive
  pack() {
    local tmp="$dest/.gpu_check.$BASHPID.tgz"
    tar czf "$tmp" -C "$OUT" . 2>/dev/null; [ $? -le 1 ] && mv "$tmp" "$dest/gpu_check.tgz" || rm -f "$tmp"
  }
  # its output elsewhere: an orphaned `sleep` holding the call's stdout would keep the call open up to 10 s
  ( while sleep 10; do pack; done ) >/dev/null 2>&1 & packer=$!
  # the packer, its tar and any half-written archive go before the last pack
  trap 'pkill -P $packer 2>/dev/null; kill $packer 2>/dev/null; wait $packer 2>/dev/null
        rm -f "$dest"/.gpu_check.*.tgz; pack' EXIT
fi
# CALL_LIMIT=<the call's timeout_s>: every step's limit is cut to what is left of the call, less 20 s to pack and
# return, so the device tool's kill never lands mid-step (a step it kills may keep the GPU busy into the next
# call); a step with no time left is skipped
started=$SECONDS
limited() {  # limited <whole seconds> <command...>
  local limit=$1; shift
  if [ -n "${CALL_LIMIT:-}" ]; then
    local left=$(( CALL_LIMIT - 20 - (SECONDS - started) ))
    (( left < limit )) && limit=$left
  fi
  if (( limit <= 0 )); then echo "skipped, no time left (CALL_LIMIT=$CALL_LIMIT): $*"; return 124; fi
  timeout "$limit" "$@"
}
mkdir -p "$OUT"
# unbuffered: a suite cut by `timeout` keeps what it printed (block-buffered output died with it)
export TRITON_DEFAULT_FP_FUSION=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
stage() { echo "== $(date +%T) $*"; }
{
  stage card
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  if ls .whl/*.whl >/dev/null 2>&1; then
    if [ "${REUSE_BUILD:-0}" = 1 ] && [ -d "$HOME/site" ]; then stage "peer wheels reused from $HOME/site"
    else
      stage "peer wheels"
      rm -rf "$HOME/site"
      python -m pip install -q --no-index --no-deps --no-compile --target "$HOME/site" .whl/*.whl
    fi
    export PYTHONPATH="$HOME/site:${PYTHONPATH:-}" PATH="$HOME/site/bin:$PATH"  # bin/: ninja, when carried
  fi
  python -c "import bitsandbytes, liger_kernel; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
  # a plain --target install (an editable one was seen not to import on that machine); EXT=0 skips the C++/CUDA
  # extension (saves its compile when only the Triton kernels are measured); REUSE_BUILD=1 keeps the install
  # of an earlier call on the same (still warm) machine
  no_ext=$([ "${EXT:-1}" = 0 ] && echo 1 || echo 0)
  if [ "${REUSE_BUILD:-0}" = 1 ] && [ -d "$HOME/qk/qlora_kernels" ]; then
    stage "build reused from $HOME/qk"
  else
    stage "build (sm_90 only)"
    rm -rf "$HOME/qk"
    QLORA_KERNELS_NO_EXT=$no_ext QLORA_KERNELS_CUDA_ARCHS=90 MAX_JOBS=16 limited 150 python -m pip install -q \
      --no-build-isolation --no-deps --target "$HOME/qk" . || echo "BUILD FAILED"
  fi
  export PYTHONPATH="$HOME/qk:${PYTHONPATH:-}"
  if [ "$no_ext" = 1 ]; then export QLORA_KERNELS_NO_EXT=1  # tests skip the CPU extension's paths
  else python -c "import qlora_kernels._C as c; print('extension with_cuda =', c.with_cuda)"; fi
  if [ "${SKIP_TESTS:-0}" = 1 ]; then stage "tests skipped (SKIP_TESTS=1)"; else
  stage "tests on CUDA"
  # TESTS="tests/test_nf4.py ..." narrows the suite (default: all of tests/), cut at TEST_TIMEOUT seconds
  # (first config of each autotune list: correctness needs no tuning, and every config costs a compile)
  # -v into $OUT/tests.log as they run: a suite cut by the timeout still says which tests passed. The two
  # kernel test files compile ~300 kernel variants on CUDA (~1 s each): with pytest-xdist carried in .whl/,
  # TEST_WORKERS processes (default 8) compile them side by side
  workers=$(python -c "import xdist, pytest; assert int(pytest.__version__.split('.')[0]) >= 7" 2>/dev/null \
    && echo "-n ${TEST_WORKERS:-8}")   # pytest-xdist 3.8 needs pytest >= 7
  echo "pytest workers: ${workers:-none (pytest-xdist not installed)}"
  # no -x: each CUDA-only test decides something on its own (a lookup, a mode, the decode kernel)
  QLORA_KERNELS_AUTOTUNE=0 limited "${TEST_TIMEOUT:-110}" python -m pytest ${TESTS:-tests} $workers -v \
    -m "not slow" --tb=short --durations=15 -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -25
  fi
  if [ "${DEMO:-0}" = 1 ]; then   # the main job on the GPU defaults (DEMO_STEPS shortens it), cut at DEMO_TIMEOUT;
    # before the suites: the main job has never run on a GPU, and the last step of a call is the one cut
    stage "qlora-kernels demo"
    limited "${DEMO_TIMEOUT:-120}" python -m qlora_kernels.cli demo --out "$OUT" \
      ${DEMO_STEPS:+--steps "$DEMO_STEPS"} > "$OUT/demo.log" 2>&1 || echo "demo FAILED or timed out"
    tail -15 "$OUT/demo.log"
  fi
  if [ "${PROFILE:-0}" = 1 ]; then   # kernel tables of the cases that missed their predictions (before the
    # suites, for the same reason as the demo): benchmarks/kernel_profile.py, cut at PROFILE_TIMEOUT
    stage "kernel profile (limit ${PROFILE_TIMEOUT:-60} s)"
    limited "${PROFILE_TIMEOUT:-60}" python -m benchmarks.kernel_profile --out "$OUT" > "$OUT/kernel_profile.log" 2>&1 \
      || { echo "FAILED or timed out:"; tail -5 "$OUT/kernel_profile.log"; }
  fi
  # BENCHES="nf4 nf4_lora_linear" picks suites (default: all); each is cut at BENCH_TIMEOUT seconds, or at
  # BENCH_TIMEOUT_<suite> (e.g. BENCH_TIMEOUT_e2e=300) where set; rows are saved as they come: a cut suite
  # leaves a table marked PARTIAL
  benches=$(if [ -n "${BENCHES:-}" ]; then printf 'benchmarks/bench_%s.py ' $BENCHES; else ls benchmarks/bench_*.py; fi)
  for bench in $benches; do
    suite=$(basename "$bench" .py); suite=${suite#bench_}
    limit_var="BENCH_TIMEOUT_$suite"
    limit=${!limit_var:-${BENCH_TIMEOUT:-75}}
    stage "$bench (limit ${limit} s)"
    limited "$limit" python -m "benchmarks.bench_$suite" --out "$OUT" > "$OUT/bench_$suite.log" 2>&1 \
      || { echo "FAILED or timed out:"; tail -5 "$OUT/bench_$suite.log"; }
  done
  stage done
} 2>&1 | tee "$OUT/gpu_check.log"
cat "$OUT"/*.md 2>/dev/null
