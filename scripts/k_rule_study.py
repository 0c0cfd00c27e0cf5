"""Candidate K rules for ``consensus.method=components``, side by side on the same factorizations.

Every set is preprocessed and factorized once per solver with the defaults (10 replicates of
rank 10), the components cached under ``--cache``; then the components consensus is computed
for K in 2..10 and each candidate rule reads the same per-K statistics::

    python scripts/k_rule_study.py --solvers mu hals             # the tuning sets
    python scripts/k_rule_study.py --heldout --solvers mu hals   # sets no rule was tuned on

Prints one line per set and solver: the planted/published K and every rule's K (with the
background programs left out of it, and the two smallest usage-CV ratios of the first pass:
docs/method.md, "The shared background").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

NORM_NONE = ["preprocess.normalize=none", "preprocess.n_top_genes=null", "preprocess.min_cells=0"]


def tuning_sets():
    out = [("Brunet leukemia", ["data=brunet_leukemia", *NORM_NONE], (2, 3)),
           ("Brunet medulloblastoma", ["data=brunet_medulloblastoma", *NORM_NONE], (2,))]
    out += [(f"Monti {n}", ["data=brunet_leukemia", f"data.dataset={n}", f"data.name={n}", *NORM_NONE], (k,))
            for n, k in (("gaussian3", 3), ("simulated4", 4), ("simulated6", 6))]
    out += [("synthetic default (6)", [], (6,))]
    out += [(f"synthetic {p} programs", ["data.n_spots=1600", "data.n_genes=1500", f"data.n_programs={p}"], (p,))
            for p in (4, 9)]
    out += [("pbmc68k_reduced", ["data=pbmc68k"], (10,))]
    return out


def heldout_sets():
    """Sets no rule was tuned on: other seeds of the Monti generator, the simulator at other
    seeds, depths, domain sharpness and marker strength (make_synthetic called directly)."""
    out = [(f"Monti {n} seed {s}", ["data=brunet_leukemia", f"data.dataset={n}", f"data.name={n}",
                                    f"+data.seed={s}", *NORM_NONE], (k,))
           for n, k in (("gaussian3", 3), ("simulated4", 4), ("simulated6", 6)) for s in (3, 11)]
    syn = [("sim 5 programs seed 7", dict(n_programs=5, seed=7)),
           ("sim 7 programs shallow (lib 800)", dict(n_programs=7, mean_library_size=800.0, seed=3)),
           ("sim 6 programs blurred (sharpness 1.5)", dict(n_programs=6, sharpness=1.5, seed=5)),
           ("sim 8 programs weak markers (fold 3)", dict(n_programs=8, marker_fold=3.0, seed=9)),
           ("sim 3 programs", dict(n_programs=3, seed=13))]
    out += [(name, {"n_spots": 1600, "n_genes": 1500, **kw}, (kw["n_programs"],)) for name, kw in syn]
    return out


def fitted(name, spec, solver, cache: Path, overrides=()):
    """Preprocessed data (truth columns only) and the default factorization's components, cached."""
    import anndata as ad

    from validate import compose
    from tardis_exp.data import load_data
    from tardis_exp.factorize import factorize
    from tardis_exp.pipeline import stage_kwargs
    from tardis_exp.preprocess import preprocess

    f = cache / f"{name.replace(' ', '_').replace('/', '_')}_{solver}.h5ad"
    if f.exists():
        return ad.read_h5ad(f)
    cfg = compose([*(spec if isinstance(spec, list) else []), f"factorize.solver={solver}", *overrides])
    if isinstance(spec, dict):
        from tardis_exp.synthetic import make_synthetic

        a = make_synthetic(**spec)
    else:
        a = load_data(cfg["data"])
    a = preprocess(a, **stage_kwargs(cfg["preprocess"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factorize(a, progress=False, **stage_kwargs(cfg["factorize"]))
    a.write_h5ad(f)
    return a


def evaluate(a, truth_k, rules, max_k=10, extra=None):
    """Run the consensus stage once per rule (K in 2..max_k); best K, margin, recovery, ARI.

    A rule is ``name[@outlier_threshold[@min_cluster_replicates]]`` (e.g. ``recurrence@0.5``)."""
    from sklearn.metrics import adjusted_rand_score

    from tardis_exp.consensus import consensus
    from tardis_exp.score import program_labels

    out = {}
    for rule in rules:
        b = a.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name, thr, reps = (rule.split("@") + [None, None])[:3]
            consensus(b, min_clusters=2, max_clusters=max_k, k_selection=name, progress=False, **(extra or {}),
                      **({"outlier_threshold": float(thr)} if thr else {}),
                      **({"min_cluster_replicates": float(reps)} if reps else {}))
        c = b.uns["nmf_consensus"]
        r = {"k": int(c["best_k"]), "runner": int(c["runner_up_k"]), "margin": float(c["k_margin"]),
             "background": int(c.get("n_background", 0))}
        if "parallel_rank" in c:
            r["parallel_rank"] = int(c["parallel_rank"])
        if "background_cv_ratio" in c:  # the first pass's programs: usage CV / the median (docs/method.md)
            rel = np.sort(np.asarray(c["background_cv_ratio"], float))
            r["bg_ratios"] = [round(float(x), 3) for x in rel[:2]]
        if "true_program" in b.var:
            from tardis_exp.metrics import program_recovery

            r["recovery"] = float(program_recovery(c["spectra"], b.var["true_program"].astype(str).to_numpy())[0])
        lab = next((k for k in ("true_domain", "class", "bulk_labels") if k in b.obs), None)
        if lab is not None:
            prog = program_labels(b.obsm["X_nmf_consensus"])
            r["ari"] = float(adjusted_rand_score(b.obs[lab].astype(str), np.asarray(prog).astype(str)))
        out[rule] = r
        out["_per_k"] = {k: np.round(np.asarray(c[k], float), 4).tolist() for k in
                         ("k_values", "pac", "cophenetic", "silhouette", "admissible", "min_replicates_per_cluster",
                          "recurrence", "recurrence_se")
                         if k in c}
        out["_per_k"]["n_items"] = int(c["n_items"])
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--solvers", nargs="+", default=["mu"])
    ap.add_argument("--rules", nargs="+", default=["pac"])
    ap.add_argument("--heldout", action="store_true")
    ap.add_argument("--only", nargs="*")
    ap.add_argument("--cache", type=Path, default=ROOT / "outputs" / "k_rule_study")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--consensus", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra consensus() arguments, e.g. rank_bound=parallel (values parsed as YAML)")
    ap.add_argument("--override", nargs="*", default=[],
                    help="extra Hydra overrides for preprocess/factorize (use a separate --cache)")
    a = ap.parse_args(argv)
    a.cache.mkdir(parents=True, exist_ok=True)
    import yaml

    extra = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in a.consensus)}
    results = []
    for name, spec, truth in (heldout_sets() if a.heldout else tuning_sets()):
        if a.only and not any(o.lower() in name.lower() for o in a.only):
            continue
        for solver in a.solvers:
            t0 = time.perf_counter()
            ad_ = fitted(name, spec, solver, a.cache, a.override)
            res = evaluate(ad_, truth, a.rules, extra=extra)
            cells = " ".join(f"{r}={v['k']}({v['runner']},{v['margin']:.1f})"
                             + (f" +{v['background']} background" if v.get("background") else "")
                             + (f" cv-ratio {v['bg_ratios'][0]:.2f}/{v['bg_ratios'][1]:.2f}" if "bg_ratios" in v else "")
                             + (f" parallel-rank {v['parallel_rank']}" if "parallel_rank" in v else "")
                             + (f" rec {v['recovery']:.2f}" if "recovery" in v else "")
                             + (f" ari {v['ari']:.2f}" if "ari" in v else "")
                             for r, v in res.items() if not r.startswith("_"))
            print(f"{name} [{solver}] truth {truth}: {cells}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            print("   ", json.dumps(res["_per_k"]), flush=True)
            results.append({"set": name, "solver": solver, "truth": list(truth), **res})
    if a.json:
        a.json.write_text(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
