"""The runner: the four stages on each draw, one JSON row per draw, the rates with Wilson
intervals (``python -m tardis_exp.benchmark``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any


from .evaluate import evaluate_batch, usage_recovery, wilson
from .families import DESIGN_SEEDS, FAMILIES, SEARCH_RANGE, draw, write_draw


def parse_overrides(items) -> dict[str, dict[str, Any]]:
    """``['factorize.tol=1e-6', ...]`` -> ``{'factorize': {'tol': 1e-6}}`` (values parsed as YAML).

    Keys are checked against the stages' parameters (tardis_exp.params); a wrong one is a
    one-line error naming it.
    """
    import yaml

    from ..errors import ConfigError
    from ..params import ConsensusParams, FactorizeParams, PreprocessParams, ScoreParams

    known = {"preprocess": PreprocessParams, "factorize": FactorizeParams, "consensus": ConsensusParams,
             "score": ScoreParams}
    out: dict[str, dict[str, Any]] = {s: {} for s in known}
    for item in items:
        key, sep, value = item.partition("=")
        stage, _, name = key.partition(".")
        if not sep or stage not in known or name not in {f.name for f in dataclasses.fields(known[stage])}:
            raise ConfigError(f"--override {item!r}: expected <stage>.<key>=<value> with a key of "
                              f"{'/'.join(known)} (tardis_exp/params.py)")
        v = yaml.safe_load(value)
        if isinstance(v, str):  # YAML 1.1 reads 1e-6 (no dot) as a string; Hydra reads it as a number
            try:
                v = float(v)
            except ValueError:
                pass
        out[stage][name] = v
    return out


class _WarningFlag(logging.Handler):
    """Records whether the consensus stage said the data do not separate K from the runner-up."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.fired = False

    def emit(self, record):
        if "do not separate" in record.getMessage():
            self.fired = True


def _candidate_fields(c) -> dict[str, Any]:
    """The stage's candidate set and each K's gap to the chosen K (``scripts/calibrate_margin.py``
    recomputes the set at any threshold from the gaps)."""
    if "k_candidates" not in c:
        return {}
    return {"k_candidates": [int(k) for k in c["k_candidates"]],
            "k_gaps": {str(int(k)): float(g) for k, g in zip(c["k_values"], c["k_gap"])}}


def run_draw(adata, overrides=(), rules=("auto",)) -> dict[str, Any]:
    """Run the four stages with their defaults (plus ``overrides``) on one draw; one result row.

    The factorization is shared by the ``rules`` (``consensus.k_selection`` values): the first
    rule's run is scored (score stage) and reported, every rule's K, runner-up and margin kept
    under ``rules``. Returns planted K, reported K, runner-up, margin, whether the "do not
    separate" warning fired, program recovery (marker precision, tardis_exp.metrics) and
    usage recovery (:func:`usage_recovery`).
    """
    from ..consensus import consensus
    from ..errors import InputError
    from ..factorize import factorize
    from ..metrics import program_recovery
    from ..preprocess import preprocess
    from ..score import score

    cfg = parse_overrides([*SEARCH_RANGE, *overrides])
    truth = adata.uns["benchmark"]
    t0 = time.perf_counter()
    multi = "sample" in adata.obs  # a study of sections (the batch family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # a study of sections: HVGs per section (scanpy's batch_key) and the per-section table
        a = preprocess(adata, **cfg["preprocess"], **({"sample_key": "sample"} if multi else {}))
        factorize(a, progress=False, **cfg["factorize"])
        per_rule = {}
        row: dict[str, Any] = {}
        for i, rule in enumerate(rules):
            b = a.copy() if len(rules) > 1 else a
            flag = _WarningFlag()
            clog = logging.getLogger("tardis_exp.consensus")
            level, propagate = clog.level, clog.propagate
            clog.addHandler(flag)
            clog.setLevel(logging.WARNING)  # records reach the flag whatever the root level is
            clog.propagate = False  # and not stderr: the table is the output
            try:
                consensus(b, progress=False, **{**cfg["consensus"], "k_selection": rule})
            except InputError as e:  # the stage refuses (e.g. the outlier filter left nothing): a miss
                per_rule[rule] = {"k": None, "runner_up": None, "margin": float("nan"), "warned": False,
                                  "error": str(e)}
                if i == 0:
                    row = {**per_rule[rule], "recovery": 0.0, "usage_r": 0.0, "n_background": 0}
                continue
            finally:
                clog.removeHandler(flag)
                clog.setLevel(level)
                clog.propagate = propagate
            c = b.uns["nmf_consensus"]
            r = {"k": int(c["best_k"]), "runner_up": int(c["runner_up_k"]), "margin": float(c["k_margin"]),
                 "warned": bool(flag.fired), **_candidate_fields(c)}
            per_rule[rule] = r
            if i == 0:
                score(b, **cfg["score"], **({"sample_key": "sample"} if multi else {}))
                rec = program_recovery(c["spectra"], b.var["true_program"].astype(str).to_numpy())[0]
                row = {**r, "recovery": float(rec),
                       "usage_r": usage_recovery(b.obsm["true_usage"], b.obsm["X_nmf_consensus"]),
                       "n_background": int(c.get("n_background", 0))}
                if multi:
                    row["batch"] = evaluate_batch(b, truth)
    return {"family": truth["family"], "seed": truth["seed"], "planted_k": truth["planted_k"],
            "n_spots": int(adata.n_obs), "n_genes": int(adata.n_vars), **row, "rules": per_rule,
            "seconds": time.perf_counter() - t0}


def run_matrix_rules(adata, overrides=(), rules=("bicv", "parallel")) -> dict[str, Any]:
    """The K of rules that read the matrix (``KRule.source == "data"``) without the factorization.

    Such a rule's K is a function of the preprocessed matrix, ``consensus.random_state`` and
    the K range (``consensus.min_clusters..max_clusters`` clipped to ``factorize.n_components``)
    only -- what the consensus stage computes (its background pass aside) whatever the solver.
    One result row as :func:`run_draw`'s, K only.
    """
    from ..consensus.heldout import data_rule_stats
    from ..krules import RULES, select_k
    from ..params import ConsensusParams, FactorizeParams
    from ..preprocess import preprocess

    cfg = parse_overrides([*SEARCH_RANGE, *overrides])
    c = {**{f.name: f.default for f in dataclasses.fields(ConsensusParams)}, **cfg["consensus"]}
    rank = cfg["factorize"].get("n_components", FactorizeParams.n_components)
    ks = list(range(int(c["min_clusters"]), min(int(c["max_clusters"]), int(rank)) + 1))
    truth = adata.uns["benchmark"]
    t0 = time.perf_counter()
    per_rule = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = preprocess(adata, **cfg["preprocess"])  # a new AnnData: the matrix the stage sees
        for rule in rules:
            if RULES[rule].source != "data":
                raise ValueError(f"--matrix-only: rule {rule!r} reads the replicates; run it without --matrix-only")
            st, spread = data_rule_stats(RULES[rule].statistic, a.X, c["random_state"],
                                         counts=a.layers.get("counts"))(ks)
            k, info = select_k(ks, st, rule, c["k_tolerance"], spread=spread, z=c["k_z"], return_info=True)
            per_rule[rule] = {"k": int(k), "runner_up": int(info["runner_up_k"]), "margin": float(info["margin"]),
                              "warned": bool(info["runner_up_k"] == k
                                             or not info["margin"] >= c["confident_margin"])}  # as report_k
    first = per_rule[rules[0]]
    return {"family": truth["family"], "seed": truth["seed"], "planted_k": truth["planted_k"],
            "n_spots": int(adata.n_obs), "n_genes": int(adata.n_vars), **first, "recovery": float("nan"),
            "usage_r": float("nan"), "n_background": 0, "rules": per_rule, "matrix_only": True,
            "seconds": time.perf_counter() - t0}


def summarize(rows, rule: str | None = None) -> dict[str, Any]:
    """Exact-K and within-one rates with 95 % Wilson intervals (``rule``: that rule's K)."""
    ks = [(r["rules"][rule]["k"] if rule else r["k"], r["planted_k"]) for r in rows]
    n = len(ks)
    exact = sum(k == t for k, t in ks)  # a run the stage refused (K None) is a miss
    near = sum(k is not None and abs(k - t) <= 1 for k, t in ks)
    return {"n": n, "exact": exact, "exact_rate": exact / n if n else float("nan"), "exact_ci": wilson(exact, n),
            "within_one": near, "within_one_rate": near / n if n else float("nan"), "within_one_ci": wilson(near, n),
            "over": sum(k is not None and k > t for k, t in ks), "under": sum(k is not None and k < t for k, t in ks),
            "failed": sum(k is None for k, _ in ks)}


def _fmt_rate(s, key):
    lo, hi = s[f"{key}_ci"]
    return f"{s[key]}/{s['n']} = {s[f'{key}_rate']:.2f} [{lo:.2f}, {hi:.2f}]"


def main(argv=None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(prog="python -m tardis_exp.benchmark",
                                 description="Draw benchmark data sets and report how often the pipeline's "
                                             "default K rule reports the planted K.")
    ap.add_argument("--family", required=True, choices=tuple(FAMILIES))
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--seed-start", type=int, default=DESIGN_SEEDS,
                    help=f"first seed (>= {DESIGN_SEEDS}: fresh draws; below: design draws)")
    ap.add_argument("--solver", default=None, help="factorize.solver (default: the stage's default)")
    ap.add_argument("--override", nargs="*", default=[], metavar="STAGE.KEY=VALUE",
                    help="stage parameters, e.g. factorize.tol=1e-6 consensus.k_selection=pac")
    ap.add_argument("--rules", nargs="*", default=None,
                    help="consensus.k_selection values measured on the same factorizations (first reported)")
    ap.add_argument("--matrix-only", action="store_true",
                    help="rules that read the matrix (bicv, parallel, parallel_counts, parallel_nb) only, without the factorization "
                         "(their K does not depend on it)")
    ap.add_argument("--max-spots", type=int, default=None)
    ap.add_argument("--max-genes", type=int, default=None)
    ap.add_argument("--jsonl", type=Path, default=None,
                    help="append one JSON line per draw; draws already there are read back, not rerun")
    ap.add_argument("--write", type=Path, default=None, metavar="DIR",
                    help="write the draws as h5ad to DIR (batch: one file per section, e.g. DIR/batch_3_S0.h5ad, "
                         "each readable by data=h5ad data.path=...) and run nothing")
    a = ap.parse_args(argv)
    if a.draws < 1:
        ap.error("--draws must be >= 1")
    if a.seed_start < 0:
        ap.error("--seed-start must be >= 0")
    overrides = [*a.override, *([f"factorize.solver={a.solver}"] if a.solver else [])]
    cfg = parse_overrides(overrides)  # a wrong key fails here, before any draw
    rules = a.rules or [cfg["consensus"].get("k_selection", "auto")]
    for r in rules:
        from ..params import K_RULES

        if r not in K_RULES:
            ap.error(f"--rules: {r!r} is not a consensus.k_selection ({', '.join(K_RULES)})")
    logging.basicConfig(level=logging.ERROR)
    done = {}
    if a.jsonl and a.jsonl.exists():
        for line in a.jsonl.read_text().splitlines():
            r = json.loads(line)
            done[r["seed"]] = r
    caps = {"max_spots": a.max_spots, "max_genes": a.max_genes}
    if a.write is not None:
        for seed in range(a.seed_start, a.seed_start + a.draws):
            for path in write_draw(draw(a.family, seed, **caps), a.write):
                print(path, flush=True)
        return []
    fresh = "fresh" if a.seed_start >= DESIGN_SEEDS else "DESIGN"
    print(f"# family {a.family}, seeds {a.seed_start}..{a.seed_start + a.draws - 1} ({fresh}), "
          f"overrides {' '.join([*SEARCH_RANGE, *overrides]) or '-'}, rules {' '.join(rules)}", flush=True)
    print(f"{'seed':>6} {'spots':>6} {'genes':>6} {'K':>3} {'rep':>4} {'2nd':>4} {'margin':>7} {'warn':>5} "
          f"{'rec':>5} {'use_r':>6} {'s':>5}  other rules", flush=True)
    rows = []
    for i, seed in enumerate(range(a.seed_start, a.seed_start + a.draws)):
        if seed in done:
            r = done[seed]
        else:
            print(f"  [{i + 1}/{a.draws}] seed {seed} ...", file=sys.stderr, flush=True)
            d = draw(a.family, seed, **caps)
            r = run_matrix_rules(d, overrides, rules) if a.matrix_only else run_draw(d, overrides, rules)
            r["overrides"] = overrides
            if a.jsonl:
                with a.jsonl.open("a") as fh:
                    fh.write(json.dumps(r) + "\n")
        rows.append(r)
        other = " ".join(f"{k}={v['k']}" for k, v in r["rules"].items() if k != rules[0])
        if r["k"] is None:
            print(f"{seed:>6} {r['n_spots']:>6} {r['n_genes']:>6} {r['planted_k']:>3}  refused: {r['error']}",
                  flush=True)
            continue
        bt = r.get("batch")
        extra = (f"  found/planted {bt['found_per_planted']} once {'yes' if bt['shared_found_once'] else 'no'} "
                 f"section-only {'found' if bt['specific_found'] else 'missed'}" if bt else "")
        print(f"{seed:>6} {r['n_spots']:>6} {r['n_genes']:>6} {r['planted_k']:>3} {r['k']:>4} {r['runner_up']:>4} "
              f"{r['margin']:>7.2f} {'yes' if r['warned'] else 'no':>5} {r['recovery']:>5.2f} {r['usage_r']:>6.2f} "
              f"{r['seconds']:>5.0f}  {other}{extra}", flush=True)
    if a.family == "batch":  # a run the consensus refused is a miss on every count
        for key, what in (("shared_found_once", "each shared program found once"),
                          ("specific_found", "section-only program found"),
                          ("specific_flagged", "section-only program flagged sample_specific")):
            vals = [r["batch"][key] if "batch" in r else False for r in rows]
            if any(v is None for v in vals):
                print(f"{a.family}: {what}: not measured (the runs have no uns['nmf_samples'])", flush=True)
                continue
            hit, n = sum(map(bool, vals)), len(vals)
            lo, hi = wilson(hit, n)
            print(f"{a.family}: {what} {hit}/{n} = {hit / n:.2f} [{lo:.2f}, {hi:.2f}] (95 % Wilson)", flush=True)
    for rule in rules:
        s = summarize(rows, rule)
        print(f"{a.family} rule {rule}: exact K {_fmt_rate(s, 'exact')}; within one "
              f"{_fmt_rate(s, 'within_one')}; over {s['over']}, under {s['under']}, refused {s['failed']} "
              f"(95 % Wilson intervals, "
              f"n = {s['n']})", flush=True)
    return rows
