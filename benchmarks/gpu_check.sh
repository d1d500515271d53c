#!/usr/bin/env bash
# One-shot check on the GPU machine: install, prewarm the kernel cache, every GPU test (skips listed with
# reasons), compute-sanitizer memcheck and racecheck, the performance floor and the mask benchmark. Everything
# lands under $OUT (default ./gpu_check_out). Budget (timeouts): prewarm 90 s, GPU tests 300 s, sanitizers
# 2 x 120 s, floor 120 s, masks 100 s: under 10 minutes with the install; typically about half that.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"

{ nvidia-smi; python -c "import sys, torch, cupy; print(sys.version); print('torch', torch.__version__, 'cuda',
torch.version.cuda, 'cupy', cupy.__version__, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1
tail -3 "$OUT/env.txt"

if ! python -m pip install --no-deps --no-build-isolation -e . > "$OUT/pip_install.log" 2>&1; then
    echo "pip install failed:"; tail -20 "$OUT/pip_install.log"; exit 1
fi

# JIT: NVRTC compiles each (pass, dtype, head dim) module once per machine (~10 s each, serially in pytest);
# compile them all in parallel into CuPy's disk cache first. Forked before the parent touches CUDA.
timeout 90 python scripts/prewarm.py > "$OUT/prewarm.log" 2>&1
echo "kernel prewarm exit $? (details in prewarm.log; pytest compiles whatever is missing)"

# The attention tests (this suite), then the other GPU-marked tests with what is left of the budget.
timeout 300 python -m pytest tests -m gpu -rs -q --tb=short --durations=15 -p no:cacheprovider \
    --junitxml="$OUT/junit_gpu.xml" > "$OUT/pytest_gpu.log" 2>&1
test_rc=$?
tail -n 40 "$OUT/pytest_gpu.log"

for tool in memcheck racecheck; do
    timeout 120 compute-sanitizer --tool $tool --error-exitcode 9 python scripts/sanitize_case.py \
        > "$OUT/$tool.log" 2>&1
    echo "compute-sanitizer $tool exit $?: $(tail -n 1 "$OUT/$tool.log")"
done

timeout 120 python benchmarks/floor.py --out "$OUT/floor.md" --json "$OUT/floor.json" > "$OUT/floor.log" 2>&1
floor_rc=$?
cat "$OUT/floor.md" 2>/dev/null || tail -n 30 "$OUT/floor.log"
timeout 100 python benchmarks/mask_bench.py --out "$OUT/masks.md" > "$OUT/masks.log" 2>&1
tail -n 18 "$OUT/masks.log"

# The device tool brings back at most 8 files from $OUT: the secondary logs travel as one archive.
(cd "$OUT" && tar czf logs.tgz --ignore-failed-read env.txt pip_install.log prewarm.log junit_gpu.xml floor.log masks.log 2>/dev/null \
    && rm -f env.txt pip_install.log prewarm.log junit_gpu.xml floor.log masks.log)
echo "GPU tests exit $test_rc (124 = timed out), floor.py exit $floor_rc; logs under $OUT"
[ "$test_rc" -eq 0 ] && [ "$floor_rc" -eq 0 ]
