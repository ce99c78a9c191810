#!/usr/bin/env bash
# One prepared GPU check for favor (it has never run on a GPU before this script):
#   1. the test subset marked `device` (reference comparisons, float16/bfloat16, decoding,
#      the property tests, the no-host-sync check) with FAVOR_TEST_DEVICE set;
#   2. benchmarks.gpu_bench: favor vs SDPA / FlashAttention at L = 4k-64k (bidirectional
#      forward, causal forward+backward, decoding).
# Writes env.json, tests.xml, tests.log, gpu_bench.json, bench.log and the summary
# gpu_check.json under --out (default: $OUT if set, else runs/gpu_check). Under 10 minutes on
# one GPU: each stage has its own time limit. Exit status 0 when the tests pass and every
# benchmark contender passed its correctness check.
#
#   bash benchmarks/gpu_check.sh                         # on a machine with a GPU
#   bash benchmarks/gpu_check.sh --device cpu --quick    # dry run on a CPU (the suite runs this)
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
QUICK=0
DEST="${OUT:-runs/gpu_check}"
PY="${PYTHON:-python}"
TEST_LIMIT=330
BENCH_LIMIT=210
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        --out) DEST="$2"; shift 2 ;;
        --quick) QUICK=1; shift ;;
        --python) PY="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
mkdir -p "$DEST"
start=$(date +%s)
# a CPU dry run only proves the script: one thread each (spinning OpenMP threads on a busy
# CPU made its tiny timings many times slower)
[ "$QUICK" = 1 ] && [ "$DEVICE" = cpu ] && export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# 0. the machine
"$PY" - "$DEST/env.json" "$DEVICE" <<'PYEOF'
import json, sys, torch, favor
dev = torch.device(sys.argv[2])
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "favor": favor.__version__,
        "device": str(dev), "cuda_available": torch.cuda.is_available()}
if dev.type == "cuda" and torch.cuda.is_available():
    p = torch.cuda.get_device_properties(dev)
    info.update(gpu=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                flash_sdp=torch.backends.cuda.flash_sdp_enabled())
json.dump(info, open(sys.argv[1], "w"), indent=2)
print("env:", info)
if dev.type == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check.sh: --device cuda but torch.cuda.is_available() is False")
PYEOF
[ $? -eq 0 ] || exit 3

# 1. the device tests (quick: only the device-agnosticism file, for a dry run)
if [ "$QUICK" = 1 ]; then
    TESTS=(tests/test_device_agnostic.py -k meta)
else
    TESTS=(-m device tests)
fi
t0=$(date +%s)
FAVOR_TEST_DEVICE="$DEVICE" timeout "$TEST_LIMIT" "$PY" -m pytest -q -p no:cacheprovider \
    --junitxml="$DEST/tests.xml" --hypothesis-show-statistics "${TESTS[@]}" >"$DEST/tests.log" 2>&1
tests_rc=$?
tests_s=$(( $(date +%s) - t0 ))
tail -n 3 "$DEST/tests.log"

# 2. the benchmark
t0=$(date +%s)
BENCH_ARGS=(--device "$DEVICE" --out "$DEST")
[ "$QUICK" = 1 ] && BENCH_ARGS+=(--quick)
timeout "$BENCH_LIMIT" "$PY" -m benchmarks.gpu_bench "${BENCH_ARGS[@]}" >"$DEST/bench.log" 2>&1
bench_rc=$?
bench_s=$(( $(date +%s) - t0 ))
tail -n 20 "$DEST/bench.log"

# 3. the summary
"$PY" - "$DEST" "$tests_rc" "$tests_s" "$bench_rc" "$bench_s" "$(( $(date +%s) - start ))" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
dest, tests_rc, tests_s, bench_rc, bench_s, total_s = Path(sys.argv[1]), *map(int, sys.argv[2:])
summary = {"tests": {"exit_code": tests_rc, "seconds": tests_s, "timed_out": tests_rc == 124},
           "bench": {"exit_code": bench_rc, "seconds": bench_s, "timed_out": bench_rc == 124},
           "seconds": total_s, "env": json.loads((dest / "env.json").read_text())}
try:
    suite = ET.parse(dest / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    summary["tests"].update({k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")})
except (OSError, ET.ParseError):
    pass
bench = dest / "gpu_bench.json"
if bench.exists():
    summary["bench"]["file"] = str(bench)
    summary["bench"]["rows"] = json.loads(bench.read_text())["rows"]
summary["ok"] = tests_rc == 0 and bench_rc == 0
(dest / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(f"gpu_check: tests exit {tests_rc} ({tests_s} s), bench exit {bench_rc} ({bench_s} s); wrote {dest / 'gpu_check.json'}")
sys.exit(0 if summary["ok"] else 1)
PYEOF
