"""Validation against published and planted answers: K chosen, sweep objectives, label ARI.

One command runs every set and writes the tables into ``docs/validation.md`` (and prints
them; a README with the ``validate.py:table`` markers gets the main table too; the front page
has none since it links to the page)::

    python scripts/validate.py            # full run (about 80 min of CPU, 2 processes: docs/validation.md)
    python scripts/validate.py --quick    # small versions of the sets (the tests run this)

For every set (data with a published K and labels, or simulated with a planted one):

``defaults``
    The default configuration (components consensus, the replicate-recurrence K rule),
    its cluster range widened to start at 2 where the answer is below the default 4.
``brunet``
    ``experiment=brunet`` (Brunet et al. 2004: restarts on all samples, K where the
    cophenetic correlation begins to fall) on the sets Brunet analysed and the Monti sets.
``sweep``
    The sweep preset's trials (``sweep=k_range``: ``factorize.n_components`` over a range,
    clusters 2..6) evaluated on every rank of the grid; each candidate objective picks its
    best trial (ties to the smaller rank), whose ``best_k`` is reported. The candidates are
    studied side by side (``## Objectives``); the preset uses the winner.

ARI is that of ``obs['nmf_program']`` (argmax of the consensus usages) against the labels
of the published/planted K; for pbmc68k_reduced, scanpy's own Leiden and Louvain at several
resolutions are computed in the same run on the same data (scanpy's PCA/neighbours).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "validation.md"
README = ROOT / "README.md"
sys.path.insert(0, str(ROOT))

OBJECTIVES = {
    # name: (metric, direction)
    "silhouette": ("consensus.silhouette", 1),
    "cophenetic_drop": ("consensus.cophenetic_drop", 1),
    "stability": ("consensus.stability", 1),
    "spot_cophenetic": ("consensus.spot_cophenetic", 1),
    "rank_cophenetic": ("consensus.rank_cophenetic", 1),
    "k_margin": ("consensus.k_margin", 1),
    "k_cophenetic": ("consensus.k_cophenetic", 1),
    "reproducibility": ("consensus.reproducibility", 1),
}


EXTRA_OVERRIDES: list[str] = []  # --override: applied to every run (e.g. factorize.solver=hals)


def compose(overrides):
    from hydra import compose as hcompose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hcompose(config_name="config", overrides=[f"paths.root_dir={ROOT}", f"paths.run_dir={ROOT}/outputs",
                                                        *overrides, *EXTRA_OVERRIDES])
    return OmegaConf.to_container(cfg, resolve=True)


_LOADED: dict = {}


def run_stages(overrides, keep=False):
    """The four stages as configured (no tracking); returns (metrics, adata)."""
    from tardis_exp.consensus import consensus
    from tardis_exp.data import load_data
    from tardis_exp.factorize import factorize
    from tardis_exp.pipeline import headline_metrics, stage_kwargs, validate
    from tardis_exp.preprocess import preprocess
    from tardis_exp.score import score

    cfg = compose(overrides)
    validate(cfg)
    key = repr(sorted(cfg["data"].items())), repr(sorted(cfg["preprocess"].items()))
    if key not in _LOADED:
        _LOADED.clear()
        _LOADED[key] = preprocess(load_data(cfg["data"]), **stage_kwargs(cfg["preprocess"]))
    adata = _LOADED[key].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        factorize(adata, progress=False, **stage_kwargs(cfg["factorize"]))
        consensus(adata, progress=False, **stage_kwargs(cfg["consensus"]))
        score(adata, **stage_kwargs(cfg["score"]))
    return headline_metrics(adata), adata


def ari(adata, key):
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(adata.obs[key].astype(str), adata.obs["nmf_program"].astype(str)))


def label_for(s, k):
    """The label column matching K (published K -> labels), else the finest one."""
    ks, labels = s["k"], s["labels"]
    return labels[ks.index(k)] if k in ks else labels[-1]


def scanpy_baseline(adata_raw, truth, resolutions):
    """Best ARI of scanpy's Leiden and Louvain (same data, scanpy's defaults + resolutions)."""
    import scanpy as sc
    from sklearn.metrics import adjusted_rand_score

    a = adata_raw.copy()
    sc.pp.pca(a, n_comps=min(50, min(a.shape) - 1), random_state=0)
    sc.pp.neighbors(a, random_state=0)
    out = {}
    for algo in ("leiden", "louvain"):
        best = (-1.0, None)
        for r in resolutions:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    if algo == "leiden":
                        sc.tl.leiden(a, resolution=r, key_added="c", random_state=0)
                    else:
                        sc.tl.louvain(a, resolution=r, key_added="c", random_state=0, flavor="igraph")
            except (Exception, BaseException) as e:  # noqa: BLE001 -- leidenalg raises BaseException
                if isinstance(e, (KeyboardInterrupt, SystemExit)):
                    raise
                out[algo] = (float("nan"), f"{type(e).__name__}")
                break
            v = adjusted_rand_score(truth, a.obs["c"])
            if v > best[0]:
                best = (float(v), r)
        else:
            out[algo] = best
    return out


def sets(quick: bool):
    syn = "data.n_spots=900 data.n_genes=800" if quick else "data.n_spots=1600 data.n_genes=1500"
    out = [
        {"name": "Brunet leukemia", "data": ["data=brunet_leukemia", "preprocess.normalize=none",
                                             "preprocess.n_top_genes=null", "preprocess.min_cells=0"],
         "k": [2, 3], "labels": ["class", "subtype"], "brunet": True, "ranks": (2, 8),
         "ref": "Brunet 2004: cophenetic high at K=2,3, drop at K=4; NMF labels ALL/AML and B/T/AML "
                "(1-2 of 38 samples off); our direct solver 0.89 / 0.83"},
        {"name": "Brunet medulloblastoma", "data": ["data=brunet_medulloblastoma", "preprocess.normalize=none",
                                                    "preprocess.n_top_genes=null", "preprocess.min_cells=0"],
         "k": [2], "labels": ["class"], "brunet": True, "ranks": (2, 6),
         "ref": "Brunet 2004: classic/desmoplastic; a desmoplastic cluster appears at K=5 "
                "(no single published K; labels C/D)"},
        *[{"name": f"Monti {n}", "data": ["data=brunet_leukemia", "data.dataset=" + n, f"data.name={n}",
                                          "preprocess.normalize=none", "preprocess.n_top_genes=null",
                                          "preprocess.min_cells=0"],
           "k": [k], "labels": ["class"], "brunet": True, "ranks": (2, 8),
           "ref": f"Monti 2003: consensus clustering recovers K={k}"}
          for n, k in (("gaussian3", 3), ("simulated4", 4), ("simulated6", 6))],
        # the defaults as a user runs them (data=pbmc68k): the loader reads scanpy's .raw,
        # log-normalized values, and the default preprocessing log-normalizes them again
        {"name": "pbmc68k_reduced", "data": ["data=pbmc68k"],
         "k": [10], "labels": ["bulk_labels"], "brunet": False, "ranks": (6, 12), "scanpy": True,
         "ref": "10 FACS bulk labels; scanpy Leiden/Louvain (same run)"},
        # ... and on .raw as it is (no second normalization)
        {"name": "pbmc68k_reduced (normalize=none)", "data": ["data=pbmc68k", "preprocess.normalize=none",
                                                              "preprocess.n_top_genes=null"],
         "k": [10], "labels": ["bulk_labels"], "brunet": False, "ranks": (6, 12), "scanpy": True,
         "ref": "10 FACS bulk labels; scanpy Leiden/Louvain (same run)"},
    ]
    variants = [(6, "", "default sim (6 programs)"), (4, "", "4 programs"), (9, "", "9 programs")]
    # depth and domain overlap (make_synthetic's mean_library_size, sharpness) are not keys
    # the data config passes on (tardis_exp.data._SYNTHETIC_KEYS): not run here yet
    for p, extra, label in variants:
        out.append({"name": f"synthetic: {label}", "data": [*syn.split(), f"data.n_programs={p}",
                                                            *([extra] if extra else [])],
                    "k": [p], "labels": ["true_domain"], "brunet": False, "ranks": (max(2, p - 1), p + 3),
                    "ref": "planted K; program recovery (top-50 markers)"})
    order = ["Brunet leukemia", "synthetic: default sim (6 programs)", "pbmc68k_reduced",
             "pbmc68k_reduced (normalize=none)", "Monti gaussian3",
             "synthetic: 4 programs", "synthetic: 9 programs", "Brunet medulloblastoma", "Monti simulated4",
             "Monti simulated6"]
    out.sort(key=lambda s: order.index(s["name"]) if s["name"] in order else len(order))
    if quick:
        out = [s for s in out if s["name"] in ("Brunet leukemia", "Monti gaussian3", "synthetic: 4 programs")]
        for s in out:
            s["ranks"] = (s["k"][0] - 1 if s["k"][0] > 2 else 2, s["k"][0] + 2)
    return out


def _fmt(x, nd=2):
    return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else f"{x:.{nd}f}"


def objective_ks(trials):
    """(best_k, n_components) of the best trial under every candidate objective."""
    from tardis_exp.consensus import reproducibility

    # the objective as the code defines it now, from the metrics a trial recorded (rows
    # saved by --rows before a change of its definition are ranked by the current one)
    trials = [{**t, "consensus.reproducibility": reproducibility(t.get("consensus.silhouette", np.nan),
                                                                 t.get("consensus.k_cophenetic", np.nan))}
              for t in trials]
    out = {}
    for name, (metric, sign) in OBJECTIVES.items():
        vals = np.array([sign * t.get(metric, np.nan) for t in trials], dtype=float)
        if np.all(~np.isfinite(vals)):
            continue
        best = int(np.nanargmax(np.where(np.isfinite(vals), vals, -np.inf)))
        out[name] = (int(trials[best]["best_k"]), trials[best]["n_components"])
    # cNMF's view: Pareto front of (stability max, reconstruction error min); knee = the
    # front point closest to the utopia point after scaling both to [0, 1]
    st = np.array([t.get("consensus.stability", np.nan) for t in trials], float)
    er = np.array([t["reconstruction_error"] for t in trials], float)
    ok = np.isfinite(st) & np.isfinite(er)
    if ok.sum() >= 2:
        front = [i for i in np.flatnonzero(ok) if not any(
            (st[j] >= st[i] and er[j] <= er[i]) and (st[j] > st[i] or er[j] < er[i]) for j in np.flatnonzero(ok))]
        s01 = (st - np.nanmin(st[ok])) / max(np.nanmax(st[ok]) - np.nanmin(st[ok]), 1e-12)
        e01 = (er - np.nanmin(er[ok])) / max(np.nanmax(er[ok]) - np.nanmin(er[ok]), 1e-12)
        knee = min(front, key=lambda i: np.hypot(1 - s01[i], e01[i]))
        out["pareto_knee"] = (int(trials[knee]["best_k"]), trials[knee]["n_components"])
    return out


def validate_set(s, quick, log):
    lo_k = 2
    rng_k = f"consensus.min_clusters={lo_k}"
    row = {"set": s["name"], "k": s["k"], "ref": s["ref"]}
    t0 = time.perf_counter()
    # defaults (K range from 2: the default 4 is above several published K)
    hi = max(s["k"]) + 3
    m, a = run_stages([*s["data"], rng_k, f"consensus.max_clusters={hi}",
                       *(["consensus.n_resamples=30"] if quick else [])])
    row["default_k"] = int(m["best_k"])
    row["default_runner"] = (int(m["runner_up_k"]), float(m["consensus.k_margin"]))
    row["default_ari"] = ari(a, label_for(s, row["default_k"]))
    if "program_recovery" in m:
        row["recovery"] = m["program_recovery"]
    if s.get("scanpy"):
        from tardis_exp.data import load_data

        raw = load_data(compose(s["data"])["data"])
        row["scanpy"] = scanpy_baseline(raw, raw.obs["bulk_labels"].astype(str), (0.3, 0.5, 0.8, 1.0, 1.5, 2.0))
    # Brunet's procedure
    if s["brunet"]:
        extra = ["consensus.n_resamples=20", "consensus.spots_max_iter=200", "consensus.max_clusters=4"] if quick \
            else [f"consensus.max_clusters={max(5, max(s['k']) + 2)}"]
        m, a = run_stages([*s["data"], "experiment=brunet", *extra])
        c = a.uns["nmf_consensus"]
        row["brunet_k"] = int(m["best_k"])
        row["brunet_ari"] = ari(a, label_for(s, row["brunet_k"]))
        row["brunet_coph"] = dict(zip([int(k) for k in c["k_values"]], np.round(np.asarray(c["cophenetic"]), 4)))
    # the sweep's trials: every rank of the grid, clusters 2..6 (clipped to the rank)
    trials = []
    for r in range(s["ranks"][0], s["ranks"][1] + 1):
        m, _ = run_stages([*s["data"], f"factorize.n_components={r}", rng_k,
                           f"consensus.max_clusters={max(6, max(s['k']) + 2)}",
                           *(["consensus.n_resamples=30"] if quick else [])])
        trials.append({"n_components": r, **m})
    row["trials"] = trials
    row["objective_k"] = objective_ks(trials)
    row["seconds"] = time.perf_counter() - t0
    log(f"{s['name']}: {time.perf_counter() - t0:.0f} s; defaults K={row['default_k']}, "
        f"objectives {row['objective_k']}, brunet {row.get('brunet_k')}")
    return row


def winner(rows, preset_objective):
    """Per objective: on how many sets its best trial has the published/planted K."""
    names = list(OBJECTIVES) + ["pareto_knee"]
    score = {n: sum(1 for r in rows if r["objective_k"].get(n, (None,))[0] in r["k"]) for n in names}
    return score


def table(rows, preset_objective, blas, cmd):
    obj_metric = preset_objective
    name = next((n for n, (m, _) in OBJECTIVES.items() if m == obj_metric), obj_metric)
    lines = [
        "| set | published/planted K | K by defaults (runner-up, margin) | K by experiment=brunet "
        f"| K of the sweep's best trial ({name}) | label ARI (nmf_program) | reference figure |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        k = " or ".join(str(x) for x in r["k"])
        d = f"{r['default_k']} ({r['default_runner'][0]}, {_fmt(r['default_runner'][1])})"
        b = "-" if "brunet_k" not in r else f"{r['brunet_k']}"
        sw = r["objective_k"].get(name)
        sw = "-" if sw is None else f"{sw[0]} (n_components={sw[1]})"
        a = f"defaults {_fmt(r['default_ari'])}"
        if "brunet_ari" in r:
            a += f"; brunet {_fmt(r['brunet_ari'])}"
        if "recovery" in r:
            a += f"; recovery {_fmt(r['recovery'])}"
        ref = r["ref"]
        if "scanpy" in r:
            ref += "; " + ", ".join(f"{algo} best {_fmt(v[0])}" + (f" (res {v[1]})" if isinstance(v[1], float) else
                                                                  f" ({v[1]})") for algo, v in r["scanpy"].items())
        lines.append(f"| {r['set']} | {k} | {d} | {b} | {sw} | {a} | {ref} |")
    score = winner(rows, preset_objective)
    lines += ["", "## Objectives", "",
              "K of the best trial under each candidate sweep objective (ties: smaller n_components):", "",
              "| set | " + " | ".join(score) + " |", "|---|" + "---|" * len(score)]
    for r in rows:
        cells = []
        for n in score:
            v = r["objective_k"].get(n)
            cells.append("-" if v is None else (f"**{v[0]}**" if v[0] in r["k"] else str(v[0])))
        lines.append(f"| {r['set']} | " + " | ".join(cells) + " |")
    lines.append("| sets right | " + " | ".join(str(v) for v in score.values()) + " |")
    brun = [r for r in rows if "brunet_coph" in r]
    if brun:
        lines += ["", "Cophenetic correlation per K under experiment=brunet:", ""]
        for r in brun:
            lines.append(f"- {r['set']}: " + ", ".join(f"K={k}: {v}" for k, v in r["brunet_coph"].items()))
    lines += ["", f"Made by {cmd}; BLAS: {blas}; {sum(r['seconds'] for r in rows):.0f} s in all."]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small versions of three sets (tests)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="markdown file whose table section is (re)written")
    ap.add_argument("--only", nargs="*", help="run only the sets whose name contains one of these")
    ap.add_argument("--override", nargs="*", default=[],
                    help="Hydra overrides for every run, e.g. factorize.solver=hals (compare solvers)")
    ap.add_argument("--rows", type=Path, help="also save the measured rows (JSON) after every set")
    ap.add_argument("--merge", type=Path, nargs="+",
                    help="write the table from rows saved by --rows (runs split over --only), computing nothing")
    a = ap.parse_args(argv)
    EXTRA_OVERRIDES[:] = a.override
    logging.basicConfig(level=logging.ERROR)
    import os

    os.environ.setdefault("TARDIS_EXP_PROGRESS", "0")
    from threadpoolctl import threadpool_info

    import yaml

    blas = ", ".join(f"{d.get('internal_api')} {d.get('num_threads')} threads" for d in threadpool_info())
    preset = yaml.safe_load((ROOT / "conf" / "sweep" / "k_range.yaml").read_text())
    objective = preset["hydra"]["sweeper"]["objectives"][0]["metric"]
    if a.merge:
        order = [s["name"] for s in sets(a.quick)]
        rows = [r for f in a.merge for r in json.loads(f.read_text())]
        rows.sort(key=lambda r: order.index(r["set"]) if r["set"] in order else len(order))
        for r in rows:
            if "trials" in r:
                r["objective_k"] = objective_ks(r["trials"])
        a.merged = len(a.merge)
        text = write(a, rows, objective, blas, final=True)
        print(text)
        return rows
    rows = []
    for s in sets(a.quick):
        if a.only and not any(o.lower() in s["name"].lower() for o in a.only):
            continue
        rows.append(validate_set(s, a.quick, lambda msg: print(msg, file=sys.stderr, flush=True)))
        # the table so far, after every set: a long run that is stopped keeps what it measured
        write(a, rows, objective, blas, final=False)
        if a.rows:
            a.rows.write_text(json.dumps(rows, default=_jsonable))
    text = write(a, rows, objective, blas, final=True)
    print(text)
    return rows


def _jsonable(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(type(x).__name__)


def write(a, rows, objective, blas, final):
    cmd = "python scripts/validate.py" + (" --quick" if a.quick else "") + (
        " --only " + " ".join(repr(o) for o in a.only) if a.only else "") + (
        " --override " + " ".join(a.override) if getattr(a, "override", None) else "")
    cmd = f"`{cmd}`"
    if getattr(a, "merged", 0):
        cmd += (f" (its sets split over {a.merged} processes, `--only ... --rows rows_i.json`, "
                f"then `--merge rows_*.json`; the sets are independent and seeded, so the figures are the same; "
                f"the seconds are the sets' wall-clock times summed, {a.merged} at once on a shared machine)")
    text = table(rows, objective, blas, cmd)
    if not final:
        text += "\n\n(partial: the run was still going when this was written)"
    if a.out:
        _replace_section(a.out, "validate.py", text, create=True)
        # the README carries the main table (not the objective study) when it has the markers
        if final and not a.quick and a.out.resolve() == DEFAULT_OUT.resolve() and README.exists():
            main_table = text.split("\n## Objectives", 1)[0].rstrip()
            made_by = text.rsplit("\n", 1)[-1]
            _replace_section(README, "validate.py:table", f"{main_table}\n\n{made_by}", create=False)
    return text


def _replace_section(path: Path, name: str, text: str, create: bool) -> None:
    """Rewrite what lies between ``<!-- NAME:begin -->`` and ``<!-- NAME:end -->`` in ``path``."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    old = path.read_text() if path.exists() else f"# Validation\n\n{begin}\n{end}\n"
    if begin not in old:
        if not create:
            return
        old += f"\n{begin}\n{end}\n"
    head, rest = old.split(begin, 1)
    tail = rest.split(end, 1)[1] if end in rest else ""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
