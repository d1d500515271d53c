#!/usr/bin/env bash
# One-shot check on the GPU machine: install, prewarm the kernel cache, run the GPU tests (skips listed with
# reasons), then the quick performance floor. Everything lands under $OUT (default ./gpu_check_out).
# Budget (timeouts): kernel prewarm 90 s, attention tests 210 s, other GPU tests 45 s, floor --quick 120 s:
# under 8 minutes with the install; typically about half that.
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
timeout 90 python - > "$OUT/prewarm.log" 2>&1 <<'PY'
import multiprocessing, os, time
from cupyflash import jit

def build(key):
    t = time.time()
    jit._raw_module(key, 0)
    return f"{key}: {time.time() - t:.1f} s"

keys = jit.module_keys()
with multiprocessing.get_context("fork").Pool(min(len(keys), os.cpu_count() or 1)) as pool:
    print("\n".join(pool.map(build, keys)))
PY
echo "kernel prewarm exit $? (details in prewarm.log; pytest compiles whatever is missing)"

# The attention tests (this suite), then the other GPU-marked tests with what is left of the budget.
MINE="tests/test_gpu_attention.py tests/test_cupy_face.py tests/test_validation.py tests/test_reference.py"
timeout 210 python -m pytest $MINE -rs -q --tb=short --durations=15 -p no:cacheprovider \
    --junitxml="$OUT/junit_attention.xml" > "$OUT/pytest_attention.log" 2>&1
test_rc=$?
tail -n 100 "$OUT/pytest_attention.log"
ignores=$(for f in $MINE; do printf -- "--ignore=%s " "$f"; done)
timeout 45 python -m pytest tests -m gpu $ignores -rs -q --tb=short -p no:cacheprovider \
    --junitxml="$OUT/junit_other_gpu.xml" > "$OUT/pytest_other_gpu.log" 2>&1
other_rc=$?
tail -n 25 "$OUT/pytest_other_gpu.log"

timeout 120 python benchmarks/floor.py --quick --out "$OUT/floor_quick.md" --json "$OUT/floor_quick.json" \
    > "$OUT/floor_quick.log" 2>&1
floor_rc=$?
cat "$OUT/floor_quick.md" 2>/dev/null || tail -n 30 "$OUT/floor_quick.log"

echo "attention tests exit $test_rc, other GPU tests exit $other_rc (124 = timed out), floor.py exit $floor_rc; logs under $OUT"
[ "$test_rc" -eq 0 ] && [ "$floor_rc" -eq 0 ]
