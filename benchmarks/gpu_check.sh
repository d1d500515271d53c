#!/usr/bin/env bash
# One-shot check on the GPU machine: install, run the whole test suite (GPU tests included, skips listed with
# reasons), then the quick performance floor. Everything lands under $OUT (default ./gpu_check_out).
# Budget: pytest <= 300 s, floor --quick <= 140 s, so the script stays under 8 minutes.
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

timeout 300 python -m pytest tests -rs -q --tb=short --durations=15 -p no:cacheprovider \
    --junitxml="$OUT/junit.xml" > "$OUT/pytest.log" 2>&1
test_rc=$?
tail -n 120 "$OUT/pytest.log"

timeout 140 python benchmarks/floor.py --quick --out "$OUT/floor_quick.md" --json "$OUT/floor_quick.json" \
    > "$OUT/floor_quick.log" 2>&1
floor_rc=$?
cat "$OUT/floor_quick.md" 2>/dev/null || tail -n 30 "$OUT/floor_quick.log"

echo "pytest exit $test_rc (124 = timed out), floor.py exit $floor_rc; logs under $OUT"
[ "$test_rc" -eq 0 ] && [ "$floor_rc" -eq 0 ]
