"""Peak memory of consensus(method='spots') against consensus.estimate_spots_memory.

Usage: python scripts/measure_spots_memory.py [max_clusters]   (default 60)

900 synthetic spots x 800 genes, K 4..max_clusters, 20 resamples (conf/consensus/spots.yaml),
30 iterations per fit (memory does not depend on iterations). The peak is the growth of
the process's maximum resident set size (ru_maxrss) during consensus().
"""

import resource
import sys

from tardis_exp.consensus import consensus, estimate_spots_memory
from tardis_exp.factorize import factorize
from tardis_exp.preprocess import preprocess
from tardis_exp.synthetic import make_synthetic

hi = int(sys.argv[1]) if len(sys.argv) > 1 else 60
a = preprocess(make_synthetic(n_spots=900, n_genes=800, n_programs=4, n_markers=40, seed=1))
factorize(a, n_components=6, n_replicates=1, max_iter=50)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
consensus(a, method="spots", min_clusters=4, max_clusters=hi, n_resamples=20, spots_max_iter=30)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
est = estimate_spots_memory(900, a.n_vars, range(4, hi + 1), 20, 400)
print(f"K 4..{hi}, {a.n_vars} genes: measured peak growth {(peak - base) / 2**20:.0f} MiB, "
      f"estimate {est / 2**20:.0f} MiB, estimate/measured {est / max(peak - base, 1):.2f}")
