#!/usr/bin/env bash
# The numerical tests (pytest -m numerics: float32 results against derived bounds) under every
# OpenBLAS kernel and BLAS thread count this CPU can run: OPENBLAS_CORETYPE=Haswell, SkylakeX,
# Zen x OPENBLAS_NUM_THREADS=1, 2 (docs/testing.md, "Numerical tolerances"). Uses .venv
# (scripts/test.sh creates it); extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
flags="$(grep -m1 '^flags' /proc/cpuinfo || true)"
kernel_of() {  # what threadpoolctl says OpenBLAS loaded (every OpenBLAS: numpy's and scipy's)
  python - <<'PY'
import numpy, scipy.linalg, threadpoolctl
got = {"%sx%d" % (i.get("architecture"), i["num_threads"]) for i in threadpoolctl.threadpool_info()
       if i["internal_api"] == "openblas"}
print(" ".join(sorted(got)) or "no OpenBLAS")
PY
}
# only the files that mark tests: collecting the whole suite imports MLflow, Playwright, ... six times
mapfile -t files < <(grep -l '@pytest.mark.numerics' tests/test_*.py)
failed=()
start=$SECONDS
for core in Haswell SkylakeX Zen; do
  need=avx2
  [ "$core" = SkylakeX ] && need=avx512f
  # Zen: scipy-openblas runs its Haswell kernels (threadpoolctl reports Haswell)
  case $core in Zen) want=Haswell ;; *) want=$core ;; esac
  for threads in 1 2; do
    cond="OPENBLAS_CORETYPE=$core OPENBLAS_NUM_THREADS=$threads"
    if [[ " $flags " != *" $need "* ]]; then
      echo "== $cond: skipped, this CPU has no ${need^^}"
      continue
    fi
    export OPENBLAS_CORETYPE=$core OPENBLAS_NUM_THREADS=$threads OMP_NUM_THREADS=$threads
    got="$(kernel_of)"
    echo "== $cond: threadpoolctl reports $got"
    if [ "$got" != "${want}x$threads" ]; then
      echo "   the forced kernel did not run (wanted ${want}x$threads)"
      failed+=("$cond")
      continue
    fi
    t0=$SECONDS
    python -m pytest -q -p no:cacheprovider -m numerics "${files[@]}" "$@" || failed+=("$cond")
    echo "   ($((SECONDS - t0)) s)"
  done
done
echo "== numerics matrix: $((SECONDS - start)) s"
if [ ${#failed[@]} -gt 0 ]; then
  printf 'FAILED under: %s\n' "${failed[@]}"
  exit 1
fi
