#!/usr/bin/env bash
# On a machine with CUDA: the CUDA tests, then `python -m bench --device cuda` (every suite: seed,
# ops, models), in under 10 minutes. Writes bench/results/cuda.md (commit it); a partial run
# (`bash bench/gpu.sh ops`: the arguments go to the bench) writes cuda-partial.md instead.
# Usage, from anywhere: bash bench/gpu.sh [suite|case …]
# Each step has its own time limit (100 + 40 + 420 s) so the whole stays under 10 minutes even if
# one hangs; a step that times out makes the script fail (exit status 124).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"   # works with or without `pip install -e .`
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

python - <<'PY' || exit 1
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"bench/gpu.sh: no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda})")
print(f"torch {torch.__version__} · CUDA {torch.version.cuda} · {torch.cuda.get_device_name()}")
PY

status=0
echo "== CUDA tests (the registry's device-parametrised checks, and the fused ops' own tests) =="
# test_ops: gradcheck/gradgradcheck and autocast on cuda for every registered op; test_fused
# runs on CPU but is quick and guards the fused ops this script benchmarks.
timeout 100 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/test_ops.py -k cuda || status=$?
timeout 40 python -m pytest -q -p no:cacheprovider -p no:warnings -x tests/test_fused.py || status=$?

echo "== python -m bench --device cuda $* =="
timeout 420 python -m bench --device cuda --threads "$OMP_NUM_THREADS" "$@" || status=$?
exit $status
