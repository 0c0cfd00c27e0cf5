"""Apply a finished run's programs to new data: usages refit on the run's fixed spectra.

``project(adata, source)`` reads the consensus spectra of a run (its folder, or an MLflow
run URI ``runs:/<id>``), normalizes the new counts as the run's ``preprocess`` section
says, over the run's genes (no new gene selection; a run's ``batch_correction`` repeated
against the genes' means it recorded, ``var['batch_mean']``), refits every spot's usages by
non-negative least squares on the fixed spectra, and scores them with the score stage's
own code. It writes

``obsm['X_<key_added>']``
    the usages (spots x programs),
``obs['<key_added>_cluster_{i}']``, ``obs['<key_added>_cluster']``, ``obs['<key_added>_program']``
    z-scored scores and labels, as :func:`tardis_exp.score.score` writes them,
``uns['<key_added>']``
    the spectra, the run's genes, ``missing_weight`` (per program, the share of its
    spectral weight on genes the new data lacks) and the source.

The same computation is the MLflow model of a run (:mod:`tardis_exp.model`): both call
:meth:`Programs.usages`. Command line::

    python -m tardis_exp.project SOURCE NEW.h5ad OUT.h5ad [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import keys
from .errors import InputError, TardisError, redact
from .params import ConsensusParams, PreprocessParams, check, defaults

log = logging.getLogger(__name__)

# past this share of one program's spectral weight on genes the new data lacks, its
# usages say more about the missing genes than about the program: refuse
MAX_MISSING_WEIGHT = 0.5
# the preprocessing keys a projection repeats (the HVG selection and QC filters are not repeated)
_PREPROCESS_KEYS = ("layer", "use_raw", "normalize", "target_sum", "scale", "batch_correction")
RUN_URI = re.compile(r"^runs:/([^/\s]+)/?$")


@dataclass
class Programs:
    """A run's programs: what a projection needs, and nothing of the run's data.

    Attributes
    ----------
    spectra
        Programs x genes, the consensus spectra (``uns['nmf_consensus']['spectra']``).
    genes
        The run's genes (its ``var_names``), the columns of ``spectra``.
    background
        The shared background spectra the consensus stage refit beside the programs
        (``consensus.background_ratio``; none by default): refit here too, then left out.
    preprocess
        The run's ``preprocess`` parameters that are repeated on new data.
    scale_sd
        Per-gene standard deviation the run divided by (``preprocess.scale=true``), or None.
    batch_mean
        Per-gene mean over the run's samples (linear scale) its batch correction brought each
        sample to (``preprocess.batch_correction``, :func:`tardis_exp.batch.correct`), or None.
    refit_max_iter
        Iterations of the usage refit (the run's ``consensus.refit_max_iter``).
    source
        Where the programs came from (a folder or ``runs:/<id>``).
    """

    spectra: np.ndarray
    genes: pd.Index
    background: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    preprocess: dict = field(default_factory=dict)
    scale_sd: np.ndarray | None = None
    batch_mean: np.ndarray | None = None
    refit_max_iter: int = ConsensusParams.refit_max_iter
    source: str = ""

    def __post_init__(self):
        self.spectra = np.asarray(self.spectra, dtype=np.float32)
        self.genes = pd.Index(np.asarray(self.genes, dtype=str))
        bg = np.asarray(self.background, dtype=np.float32)
        self.background = bg if bg.size else np.zeros((0, len(self.genes)), np.float32)

    @property
    def n_programs(self) -> int:
        return self.spectra.shape[0]

    # -- files: the model's artifact -----------------------------------------------
    def save(self, folder: str | Path) -> dict[str, str]:
        """Write ``programs.npz`` (arrays) and ``programs.json`` (parameters) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {"spectra": self.spectra, "genes": np.asarray(self.genes, dtype=str), "background": self.background}
        if self.scale_sd is not None:
            arrays["scale_sd"] = np.asarray(self.scale_sd, dtype=np.float32)
        if self.batch_mean is not None:
            arrays["batch_mean"] = np.asarray(self.batch_mean, dtype=np.float64)
        np.savez_compressed(folder / "programs.npz", **arrays)
        meta = {"preprocess": self.preprocess, "refit_max_iter": int(self.refit_max_iter), "source": self.source}
        (folder / "programs.json").write_text(json.dumps(meta, indent=1))
        return {"arrays": str(folder / "programs.npz"), "params": str(folder / "programs.json")}

    @classmethod
    def load(cls, folder: str | Path, source: str | None = None) -> "Programs":
        folder = Path(folder)
        with np.load(folder / "programs.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        meta = json.loads((folder / "programs.json").read_text())
        return cls(arrays["spectra"], arrays["genes"], arrays.get("background", np.zeros((0, 0))),
                   meta.get("preprocess") or {}, arrays.get("scale_sd"), arrays.get("batch_mean"),
                   int(meta.get("refit_max_iter", ConsensusParams.refit_max_iter)),
                   source or meta.get("source", ""))

    @classmethod
    def from_result(cls, adata: ad.AnnData, cfg: Mapping[str, Any], source: str = "") -> "Programs":
        """The programs of a run's AnnData (after the consensus stage) and its config."""
        key = keys.CONSENSUS  # a run's result holds the stages' default keys
        cons = adata.uns.get(key)
        if not isinstance(cons, Mapping) or "spectra" not in cons:
            raise InputError(f"{source or 'the run'} has no programs: its result has no "
                             f"uns['{key}']['spectra'] (did the consensus stage finish?)")
        pre = {k: v for k, v in (cfg.get("preprocess") or {}).items() if k in _PREPROCESS_KEYS}
        if "normalize" not in pre and "normalize" in (adata.uns.get("preprocess") or {}):
            pre["normalize"] = adata.uns["preprocess"]["normalize"]  # no config.yaml: the result's record
        params = {k: check("preprocess", pre)[k] for k in _PREPROCESS_KEYS}  # the declared defaults filled in
        sd = adata.var["scale_sd"].to_numpy() if "scale_sd" in adata.var else None
        bm = adata.var["batch_mean"].to_numpy(np.float64) if "batch_mean" in adata.var else None
        con = {k: v for k, v in (cfg.get("consensus") or {}).items() if k == "refit_max_iter"}
        refit = int(check("consensus", con)["refit_max_iter"])
        return cls(np.asarray(cons["spectra"]), adata.var_names, np.asarray(cons.get("background_spectra", [])),
                   params, sd, bm, refit, source)

    # -- the projection ------------------------------------------------------------
    def missing_weight(self, present: np.ndarray) -> np.ndarray:
        """Per program, the share of its spectral weight on the genes not ``present``."""
        total = self.spectra.sum(1, dtype=np.float64)
        lost = self.spectra[:, ~present].sum(1, dtype=np.float64)
        return lost / np.where(total > 0, total, 1)

    def align(self, X, var_names, *, max_missing_weight: float = MAX_MISSING_WEIGHT,
              samples: np.ndarray | None = None, repeat_batch_correction: bool = True):
        """The new counts normalized over the run's genes they hold; raise past ``max_missing_weight``.

        ``samples`` (integer code per spot, or None: one sample) are the new data's sections,
        each brought onto the run's gene scale when the run corrected batches
        (:meth:`_correct`; ``repeat_batch_correction=False`` leaves it out).

        Returns ``(Xn, present, missing_weight)``: ``Xn`` spots x present genes (float32, in
        the run's gene order), ``present`` a mask over the run's genes.
        """
        from .preprocess import validate_counts

        var_names = pd.Index(np.asarray(var_names, dtype=str))
        if not var_names.is_unique:
            dup = var_names[var_names.duplicated()].unique()[:5].tolist()
            raise InputError(f"the new data has duplicated gene names (e.g. {dup}); make them unique first")
        idx = var_names.get_indexer(self.genes)
        present = idx >= 0
        if not present.any():
            raise InputError(f"the new data shares no gene with the {len(self.genes)} genes of {self.source} "
                             f"(e.g. run: {list(self.genes[:3])}, new: {list(var_names[:3])})")
        mw = self.missing_weight(present)
        worst = int(np.argmax(mw))
        if mw[worst] > max_missing_weight:
            raise InputError(
                f"program {worst} of {self.source} has {mw[worst]:.0%} of its weight on genes the new data "
                f"lacks ({int((~present).sum())} of the run's {len(self.genes)} genes are missing); "
                f"more than max_missing_weight={max_missing_weight:g}")
        method = {**defaults(PreprocessParams), **self.preprocess}["batch_correction"]
        if method != "none" and repeat_batch_correction and self.batch_mean is None:  # before any compute
            raise InputError(f"{self.source} ran preprocess.batch_correction={method} but does not record its "
                             "genes' means over its samples (var['batch_mean']: a run from before they were "
                             "recorded); rerun it, or project with repeat_batch_correction=False")
        X = X[:, idx[present]]
        validate_counts(X, "the new data's counts in the run's genes")
        Xn = self._normalize(X, present, samples if repeat_batch_correction else None, repeat_batch_correction)
        return Xn, present, mw

    def _normalize(self, X, present, samples=None, batch: bool = True):
        from .batch import correct
        from .preprocess import normalize_counts, scale_genes

        p = {**defaults(PreprocessParams), **self.preprocess}
        tmp = ad.AnnData(X=sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, np.float32))
        with warnings.catch_warnings():  # spots without counts in these genes stay zero
            warnings.simplefilter("ignore", UserWarning)
            normalize_counts(tmp, p["normalize"], p["target_sum"])
        if batch and p["batch_correction"] != "none":
            # as the run did after its normalization: each gene of each new section divided by
            # (its mean there / the run's mean over its samples), so the sections sit on the run's scale
            if samples is not None:
                tmp.obs["_sample"] = pd.Categorical(np.asarray(samples))
            correct(tmp, "_sample" if samples is not None else None, p["batch_correction"], p["normalize"],
                    reference=np.asarray(self.batch_mean, np.float64)[present])
        X = tmp.X
        if p.get("scale"):
            if self.scale_sd is not None:
                sd = np.asarray(self.scale_sd, np.float32)[present]
            else:  # a run from before var['scale_sd']: the new data's own spread
                warnings.warn(f"{self.source} does not record its genes' scale (var['scale_sd']); "
                              "scaling by the new data's own standard deviation", UserWarning, stacklevel=3)
                Xd = X.toarray() if sp.issparse(X) else X
                sd = Xd.std(0).astype(np.float32)
            sd = np.where(sd > 0, sd, 1).astype(np.float32)
            X = scale_genes(X, sd)
        return sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else np.asarray(X, np.float32)

    def usages(self, X, var_names, *, max_missing_weight: float = MAX_MISSING_WEIGHT,
               samples: np.ndarray | None = None, repeat_batch_correction: bool = True):
        """Usages of the new spots (spots x programs, float32) by NNLS on the fixed spectra.

        ``X`` holds counts (spots x genes named ``var_names``); ``samples`` labels its
        sections (None: one), as :meth:`align` reads them. Returns ``(usages, present,
        missing_weight, Xn)`` (``Xn``: the normalized counts over the present genes).
        """
        from .nmf import refit_usage

        Xn, present, mw = self.align(X, var_names, max_missing_weight=max_missing_weight, samples=samples,
                                     repeat_batch_correction=repeat_batch_correction)
        H = np.vstack([self.spectra, self.background])[:, present]
        if Xn.shape[0] == 0:
            return np.zeros((0, self.n_programs), np.float32), present, mw, Xn
        W, _ = refit_usage(Xn, H, max_iter=self.refit_max_iter, progress=False)
        return np.asarray(W[:, :self.n_programs], dtype=np.float32), present, mw, Xn


# ---------------------------------------------------------------- sources


def _read_run_dir(folder: Path, source: str) -> Programs:
    import yaml

    result = folder / "result.h5ad"
    if not result.is_file():
        raise InputError(f"{source} has no programs: no result.h5ad there (save_result=none, or not a run folder)")
    cfg_path = folder / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.is_file() else {}
    try:
        adata = ad.read_h5ad(result, backed="r")  # X stays on disk: only uns and var are needed
    except Exception as e:  # noqa: BLE001 -- any reader error: the file is the cause
        raise InputError(f"{source}: cannot read result.h5ad: {type(e).__name__}: {e}") from None
    try:
        return Programs.from_result(adata, cfg or {}, source)
    finally:
        adata.file.close()


def _read_mlflow(run_id: str, source: str, tracking_uri: str | None) -> Programs:
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    where = redact(tracking_uri or mlflow.get_tracking_uri())
    try:
        client.get_run(run_id)
        names = {a.path for a in client.list_artifacts(run_id)}
    except MlflowException as e:
        raise InputError(f"{source} does not resolve in {where}: {str(e).splitlines()[0][:300]}") from None
    except Exception as e:  # noqa: BLE001 -- an unreachable server, a bad URI
        raise InputError(f"{source}: cannot reach the tracking store {where}: {type(e).__name__}") from None
    with tempfile.TemporaryDirectory(prefix="tardis_exp_project_") as tmp:
        if "programs" in names:  # the run's model holds the programs alone: no result to download
            path = client.download_artifacts(run_id, "programs", tmp)
            found = sorted(Path(path).rglob("programs.npz"))
            if not found:
                raise InputError(f"{source}: its 'programs' artifact holds no programs.npz")
            return Programs.load(found[0].parent, source)
        if "result.h5ad" not in names:
            raise InputError(f"{source} has no programs: neither a 'programs' model nor result.h5ad among "
                             f"its artifacts ({sorted(names) or 'none'})")
        for name in ("result.h5ad", "config.yaml"):
            if name in names:
                client.download_artifacts(run_id, name, tmp)
        return _read_run_dir(Path(tmp), source)


def load_programs(source, *, tracking_uri: str | None = None) -> Programs:
    """The programs of a run folder, an MLflow run URI ``runs:/<id>``, or a saved :class:`Programs` folder."""
    if isinstance(source, Programs):
        return source
    text = str(source)
    m = RUN_URI.match(text)
    if m:
        return _read_mlflow(m.group(1), text, tracking_uri)
    if text.startswith("runs:"):
        raise InputError(f"source {text!r} is not an MLflow run URI of the form runs:/<run_id>")
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise InputError(f"source {text} is neither a run folder nor an MLflow run URI (runs:/<run_id>)")
    if (folder / "programs.npz").is_file():
        return Programs.load(folder, text)
    return _read_run_dir(folder, text)


# ---------------------------------------------------------------- the function


def _counts(adata: ad.AnnData, p: Mapping[str, Any]):
    if p.get("use_raw"):
        if adata.raw is None:
            raise InputError("the source run read adata.raw (preprocess.use_raw=true) but the new data has no .raw")
        return adata.raw.X, adata.raw.var_names
    layer = p.get("layer")
    if layer is not None:
        if layer not in adata.layers:
            raise InputError(f"the source run read preprocess.layer={layer!r}; the new data has layers "
                             f"{list(adata.layers)}")
        return adata.layers[layer], adata.var_names
    return adata.X, adata.var_names


def project(adata: ad.AnnData, source, *, key_added: str = "nmf_projected", copy: bool = False,
            max_missing_weight: float = MAX_MISSING_WEIGHT, tracking_uri: str | None = None,
            repeat_batch_correction: bool = True, **score_params) -> ad.AnnData | None:
    """Score new data against a finished run's programs.

    Parameters
    ----------
    adata
        New data: counts (spots x genes) where the source run read them (``X``, or its
        ``preprocess.layer`` / ``.raw``).
    source
        The run: its folder (``outputs/runs/<...>/``, holding ``result.h5ad`` and
        ``config.yaml``), an MLflow run URI ``runs:/<run_id>``, or a :class:`Programs`.
    key_added
        Where the result goes: ``obsm['X_<key_added>']`` (usages), ``uns['<key_added>']``
        (spectra, genes, ``missing_weight``) and the score stage's keys with this prefix
        (``obs['<key_added>_program']``, ``obs['<key_added>_cluster_{i}']``, ...).
    copy
        Return a modified copy instead of writing into ``adata``.
    max_missing_weight
        Refuse (:class:`~tardis_exp.errors.InputError`) when a program has more than this
        share of its spectral weight on genes the new data lacks.
    tracking_uri
        Where to resolve ``runs:/`` sources (default: MLflow's, ``MLFLOW_TRACKING_URI``).
    repeat_batch_correction
        A source run with ``preprocess.batch_correction`` other than ``none``: bring each
        section of the new data (``obs[sample_key]`` with ``sample_key=``, else all of it) onto
        the run's per-gene means, as the run brought its samples (False: leave the new data's
        gene scale as it is).
    **score_params
        Passed to :func:`tardis_exp.score.score` (``n_cluster_genes``, ``spatial_key``,
        ``sample_key`` for several sections: ``uns['<key_added>_samples']``, ...).
    """
    from .keys import consensus_keys, score_keys
    from .score import check_params, sample_codes, score

    cons, out = consensus_keys(key_added), score_keys(key_added)
    check_params(**score_params)
    if score_params.get("sample_key") is not None:  # a missing column: one line, before any compute
        sample_codes(adata, score_params["sample_key"])
    if not isinstance(repeat_batch_correction, bool):
        raise TypeError(f"repeat_batch_correction={repeat_batch_correction!r}: give True or False")
    programs = load_programs(source, tracking_uri=tracking_uri)
    X, var_names = _counts(adata, programs.preprocess)
    samples = None
    if score_params.get("sample_key") is not None:
        samples = adata.obs[score_params["sample_key"]].astype(str).to_numpy()
    U, present, mw, Xn = programs.usages(X, var_names, max_missing_weight=max_missing_weight, samples=samples,
                                         repeat_batch_correction=repeat_batch_correction)
    if mw.any():
        log.warning("project: %d of the run's %d genes are missing; weight lost per program: %s",
                    int((~present).sum()), len(present), np.round(mw, 3).tolist())

    # the score stage on the normalized counts over the present genes: the same code, the same keys
    genes = programs.genes[present]
    sample_key = score_params.get("sample_key")  # several sections: Moran's I and shares per section
    work = ad.AnnData(X=Xn, obs=adata.obs[[sample_key] if sample_key in adata.obs else []].copy(),
                      var=pd.DataFrame(index=genes),
                      obsm={k: v for k, v in adata.obsm.items() if k == score_params.get("spatial_key", "spatial")})
    work.obsm[cons.usage] = U
    work.uns[cons.uns] = {"spectra": programs.spectra[:, present]}
    score(work, consensus_key=key_added, key_added=key_added, **score_params)

    adata = adata.copy() if copy else adata
    adata.obsm[cons.usage] = U
    for col in work.obs.columns.drop(sample_key, errors="ignore"):
        adata.obs[col] = work.obs[col].values  # categorical labels stay categorical
    for key in (out.programs, out.metrics, out.samples):
        if key in work.uns:
            adata.uns[key] = work.uns[key]
        elif key in adata.uns:  # an earlier projection's table must not pass for this one's
            del adata.uns[key]
    adata.uns[cons.uns] = {
        "spectra": programs.spectra, "genes": np.asarray(programs.genes, dtype=str),
        "missing_weight": mw, "n_missing_genes": int((~present).sum()), "source": redact(programs.source),
        "preprocess": json.dumps(programs.preprocess),
    }
    log.info("project: %d spots scored against %d programs of %s", adata.n_obs, programs.n_programs,
             redact(programs.source))
    return adata if copy else None


# ---------------------------------------------------------------- command line


def _record(source: str, tracking_uri: str, new: str, out_path: str, adata: ad.AnnData, key: str) -> str:
    """The projection as its own MLflow run, tagged with its source run."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    m = RUN_URI.match(source)
    exp_id = client.get_run(m.group(1)).info.experiment_id if m else None
    if exp_id is None:
        exp = client.get_experiment_by_name("tardis-exp")
        exp_id = exp.experiment_id if exp else client.create_experiment("tardis-exp")
    tags = {"tardis_exp.source": redact(source), "tardis_exp.kind": "projection"}
    if m:
        tags["tardis_exp.source_run"] = m.group(1)
    run = client.create_run(exp_id, run_name=f"project {Path(new).name}", tags=tags)
    rid = run.info.run_id
    mw = np.asarray(adata.uns[key]["missing_weight"])
    client.log_param(rid, "source", redact(source))
    client.log_param(rid, "data", str(new))
    client.log_metric(rid, "n_spots", float(adata.n_obs))
    client.log_metric(rid, "n_missing_genes", float(adata.uns[key]["n_missing_genes"]))
    for p, v in enumerate(mw):
        client.log_metric(rid, "missing_weight", float(v), step=p)
    client.log_artifact(rid, out_path)
    client.set_terminated(rid, "FINISHED")
    return rid


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tardis_exp.project",
                                 description="Score new data against a finished run's programs.")
    ap.add_argument("source", help="the run: its folder, or an MLflow run URI runs:/<run_id>")
    ap.add_argument("new", help="the new data (.h5ad, counts)")
    ap.add_argument("out", help="where to write the scored data (.h5ad)")
    ap.add_argument("--tracking-uri", default=None,
                    help="MLflow tracking URI: resolves runs:/ sources and records the projection as a run")
    ap.add_argument("--key-added", default="nmf_projected", help="key of the result (default nmf_projected)")
    ap.add_argument("--max-missing-weight", type=float, default=MAX_MISSING_WEIGHT,
                    help="refuse past this share of a program's weight on missing genes "
                         f"(default {MAX_MISSING_WEIGHT})")
    a = ap.parse_args(argv)
    try:
        new = Path(a.new)
        if not new.is_file():
            raise InputError(f"the new data {new} does not exist")
        try:
            adata = ad.read_h5ad(new)
        except Exception as e:  # noqa: BLE001 -- the file is the cause
            raise InputError(f"cannot read {new} as .h5ad: {type(e).__name__}: {e}") from None
        project(adata, a.source, key_added=a.key_added, max_missing_weight=a.max_missing_weight,
                tracking_uri=a.tracking_uri)
        adata.write_h5ad(a.out)
        if a.tracking_uri:
            rid = _record(a.source, a.tracking_uri, a.new, a.out, adata, a.key_added)
            print(f"projection run: {rid}")
    except TardisError as e:
        print(f"tardis_exp.project: error: {e}", file=sys.stderr)
        return 2
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
