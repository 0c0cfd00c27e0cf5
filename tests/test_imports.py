"""Import hygiene: the pure-NumPy metrics load without scanpy; the stage names stay functions.

Each check runs in a fresh interpreter (``sys.modules`` of this one already holds everything).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from tardis_exp.metrics import program_recovery


def _fresh(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_metrics_imports_neither_scanpy_nor_a_stage():
    loaded = _fresh(
        "import sys, json, tardis_exp.metrics\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('scanpy', 'anndata', 'sklearn', 'tardis_exp'))))"
    )
    assert "scanpy" not in loaded and "anndata" not in loaded
    # the package itself registers the config schemas (params, errors and the registries of K
    # rules and solvers params reads its choices from: standard library only)
    assert sorted(m for m in loaded if m.startswith("tardis_exp")) == [
        "tardis_exp", "tardis_exp.errors", "tardis_exp.krules", "tardis_exp.metrics", "tardis_exp.params",
        "tardis_exp.solvers"]


def test_stage_names_are_the_functions_whichever_import_comes_first():
    # a submodule imported first (as pipeline.py does) must not shadow the function of the same name
    kinds = _fresh(
        "import json, types\n"
        "from tardis_exp.score import check_params\n"
        "import tardis_exp.preprocess\n"
        "import tardis_exp\n"
        "names = ['preprocess', 'factorize', 'consensus', 'score', 'BatchedNMF', 'fit_batch', 'make_synthetic']\n"
        "print(json.dumps({n: [getattr(tardis_exp, n).__module__, getattr(tardis_exp, n).__name__] "
        "for n in names}))"
    )
    assert kinds == {
        "preprocess": ["tardis_exp.preprocess", "preprocess"],
        "factorize": ["tardis_exp.factorize", "factorize"],
        "consensus": ["tardis_exp.consensus", "consensus"],
        "score": ["tardis_exp.score", "score"],
        "BatchedNMF": ["tardis_exp.nmf", "BatchedNMF"],
        "fit_batch": ["tardis_exp.nmf", "fit_batch"],
        "make_synthetic": ["tardis_exp.synthetic", "make_synthetic"],
    }


def test_program_recovery_without_scanpy_matches_a_hand_count():
    # 2 true programs with 3 markers each among 8 genes; recovered program 1 ranks t0's markers
    # first (precision 1), program 0 has 2 of t1's 3 markers in its top 3 (precision 2/3)
    truth = np.array(["t0", "t0", "t0", "t1", "t1", "t1", "none", "none"])
    spectra = np.array([
        [0.0, 0.0, 0.0, 5.0, 4.0, 0.0, 3.0, 0.0],
        [5.0, 4.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    ])
    recovery, match = program_recovery(spectra, truth, n_genes=50, ranking="loading")
    assert list(match) == [1, 0]
    assert abs(recovery - (1.0 + 2.0 / 3.0) / 2) < 1e-12


def test_tracking_and_the_cli_load_no_scientific_stack():
    # the CLI's error path (cli._fail -> tracking.redact) and the sweeper import tracking; the
    # metric keys the stage modules declare are built on first use, not at import
    loaded = _fresh(
        "import sys, json, tardis_exp.tracking, tardis_exp.cli\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('scanpy', 'anndata', 'sklearn', 'numba', 'mlflow'))))"
    )
    assert loaded == []
    n = _fresh("import json, tardis_exp.tracking as t\nprint(json.dumps([len(t.METRIC_KEYS), "
               "t.metric_key('best_k').runs]))")
    assert n[0] > 20 and "consensus" in n[1]
