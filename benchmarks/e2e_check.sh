#!/usr/bin/env bash
# One-shot device run for the end-to-end step (issue 15's measurements): install, prewarm the kernel cache, the GPT
# step with Inductor + SDPA and the backend's steps in turns at the four shapes, the host time per call beside SDPA's
# own ops, and the T 512 step's profile. Everything lands under $OUT (default ./e2e_check_out). Budget (timeouts):
# prewarm 90 s, e2e 360 s, host 45 s, profile 90 s: under 10 minutes with the install (typically ~8).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/e2e_check_out}
mkdir -p "$OUT"
if ! python -m pip install --no-deps --no-build-isolation -e . > "$OUT/pip_install.log" 2>&1; then
    echo "pip install failed:"; tail -20 "$OUT/pip_install.log"; exit 1
fi
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 90 python scripts/prewarm.py > "$OUT/prewarm.log" 2>&1
echo "kernel prewarm exit $?"
cd benchmarks
timeout 360 python e2e_step.py --variants inductor-sdpa cupyflash --interleave --warmup 3 --steps 10 \
    --out "$OUT/e2e.md" > "$OUT/e2e.log" 2>&1
echo "e2e_step exit $?"; sed -n '/Step time/,/Peak memory/p' "$OUT/e2e.md" 2>/dev/null || tail -n 20 "$OUT/e2e.log"
timeout 45 python host_overhead.py > "$OUT/host_overhead.log" 2>&1
echo "host_overhead exit $?"; cat "$OUT/host_overhead.log"
timeout 90 python e2e_profile.py --shape 512x8x12 --steps 5 --warmup 3 --top 20 --out "$OUT/profile" \
    > "$OUT/profile.log" 2>&1
echo "e2e_profile exit $?"; sed -n '/^| variant/,/^## Kernels/p' "$OUT/profile.log"
find "$OUT/profile" -name "*.json" -delete  # traces: too large to bring back
# The device tool brings back at most 8 files from $OUT: the secondary logs travel as one archive.
(cd "$OUT" && tar czf logs.tgz --ignore-failed-read pip_install.log prewarm.log e2e.log profile/*.cpu.txt 2>/dev/null \
    && rm -f pip_install.log prewarm.log e2e.log profile/*.cpu.txt)
