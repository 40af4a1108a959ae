#!/usr/bin/env bash
# The cuda backend on a real NVIDIA GPU (written for a lent H200), in one short run:
#   1. versions: torch, CUDA, triton, the GPU and its compute capability (nothing is installed);
#   2. `dsv3-rt backends` (probe lines of every backend);
#   3. the conformance suite for backend cuda -> $OUT/cuda.json, $OUT/cuda.md, $OUT/cuda.xml;
#   4. the cuda backend's own tests, natively on the GPU (no interpreter) -> $OUT/pytest.xml;
#   5. `dsv3-rt run --backend cuda --mtp 1` on the embedded default model;
#   6. greedy MTP output equals plain greedy output on cuda, every dtype, k = 1 and 3 -> $OUT/mtp-tests.xml;
#   7. bench/bench_gpu.py: cuda bf16 / fp8 against transformers bf16 on the same GPU -> $OUT/gpu.json;
#   8. bench/bench_mtp.py --quick on cuda: MTP speedup and acceptance on the default model -> $OUT/mtp-cuda.json.
# Run from the repository root: OUT=/some/dir bash bench/gpu_check.sh (about 5 minutes; at most 10). Everything is also logged to
# $OUT/gpu_check.log. Exit status: the number of failed steps (0 = all passed).
set -u
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the package from this checkout, not installed
unset TRITON_INTERPRET                                  # the kernels must compile for the GPU
PY="${PYTHON:-python3}"
failed=0

step() {  # step NAME TIMEOUT_S CMD...
    local name="$1" limit="$2"; shift 2
    echo "=== $name ($(date +%T))"
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

{
    step versions 30 "$PY" - <<'PYEOF'
import importlib.util, sys
import torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except Exception as e:  # noqa: BLE001
    print("triton NOT importable:", type(e).__name__, e)
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"GPU {i}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB")
else:
    print("torch sees no CUDA GPU")
missing = [m for m in ("pluggy", "yaml", "safetensors", "tokenizers", "jinja2", "tqdm", "gguf", "pytest", "transformers")
           if importlib.util.find_spec(m) is None]
print("missing python packages:", ", ".join(missing) or "none")
sys.exit(1 if missing or not torch.cuda.is_available() else 0)
PYEOF
    step backends 30 "$PY" -m dsv3_rt backends
    step conformance 150 "$PY" -m dsv3_rt conformance --backend cuda -q \
        --report "$OUT/cuda.json" --markdown "$OUT/cuda.md" --junit "$OUT/cuda.xml"
    step backend-tests 120 "$PY" -m pytest -q -p no:cacheprovider --junitxml "$OUT/pytest.xml" \
        tests/test_triton_kernels.py tests/test_cuda_rocm_backends.py
    step cli-run 60 "$PY" -m dsv3_rt run --backend cuda --no-chat --prompt "def add(a, b):" --max-new-tokens 24 --mtp 1
    step mtp-tests 60 "$PY" -m pytest -q -p no:cacheprovider --junitxml "$OUT/mtp-tests.xml" \
        tests/test_mtp.py -k "every_available and cuda"
    step bench-gpu 150 "$PY" bench/bench_gpu.py --out "$OUT/gpu.json"
    step bench-mtp 130 "$PY" bench/bench_mtp.py --quick --backend cuda --dtypes bfloat16,fp8 --out "$OUT/mtp-cuda.json"
    echo "=== failed steps: $failed; results in $OUT"
    exit "$failed"
} 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
