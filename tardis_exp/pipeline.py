"""The whole run, top to bottom: validate -> load -> preprocess -> factorize -> consensus -> score.

Each stage is a plain function on AnnData (its own module, its own config group); this
file only wires them to the config, to MLflow (one parent run, one child run per stage)
and to the run directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import anndata as ad
import numpy as np
import pandas as pd
import yaml

from . import __version__
from .cache import StageCache, write_h5ad
from .consensus import check_resources as check_consensus_resources
from .consensus import consensus
from .config import complete, result_mode, validate  # noqa: F401 -- validate: re-exported
from .data import load_data
from .keys import ResultKeys
from .errors import Interrupted, disk_error
from .factorize import check_params as check_factorize
from .factorize import factorize
from .preprocess import preprocess
from .config import check_genes
from .score import sample_table, score, top_genes_table
from .stages import ORDER, SPECS
from .tracking import Tracker, redact, redact_tree, run_description, science_params

log = logging.getLogger(__name__)

# Config keys that are not arguments of the stage functions.
_NOT_ARGS = {"_target_"}


def stage_kwargs(section: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if k not in _NOT_ARGS}


def check_shape(cfg: Mapping[str, Any], shape: tuple[int, int]) -> None:
    """The checks that need the preprocessed data's shape (spots, genes), before the factorization."""
    check_factorize(**stage_kwargs(cfg["factorize"]), shape=shape)
    check_consensus_resources(shape, **stage_kwargs(cfg["consensus"]))
    check_genes(int(shape[1]), int(cfg["score"]["n_cluster_genes"]),
                f"the preprocessed data has {shape[1]} genes (preprocess.n_top_genes and the "
                "gene filters)")


# gzip level 1 (h5py: an integer compression is gzip at that level) for the run folder's files:
# at 200,000 spots result.h5ad was written in 0.73x the time of h5py's default level 4 for
# 3.5 % more disk (266 against 257 MB), usages.tsv.gz in 0.56x for 10 % more (pandas'
# default is level 9); docs/performance.md, "Writing the result"
GZIP_LEVEL = 1
def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parent.parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _atomic_write(path: Path, write) -> None:
    """``write(tmp)`` beside ``path``, then rename: a kill or a full disk never leaves a
    half-written file under the final name (the temporary file is removed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise disk_error(e, path.parent, f"write {path.name}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_write_h5ad(adata, path: Path) -> None:
    # built in memory, written in one plain write: a full disk is one OSError (see write_h5ad)
    _atomic_write(path, lambda tmp: write_h5ad(adata, tmp, compression=GZIP_LEVEL))


def _atomic_write_text(text: str, path: Path) -> None:
    _atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises :class:`~tardis_exp.errors.Interrupted` (a KeyboardInterrupt) in the
    main thread, so that it ends the run as Ctrl-C does: runs marked KILLED, temporary
    files removed. Elsewhere (a worker thread) the handler cannot be set: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Interrupted(f"terminated by signal {signal.Signals(signum).name}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def headline_metrics(adata) -> dict[str, float]:
    """The numbers a runs table compares: the metrics the stages declare as headline
    (``SPEC.metrics`` of factorize, consensus and score; absent before a stage ran)."""
    out: dict[str, float] = {}
    for name in ("factorize", "consensus", "score"):
        spec = SPECS[name]
        if all(o.key in adata.uns for o in spec.writes if o.slot == "uns" and not o.when):
            out.update(spec.headline(adata))
    return out


def _report(stage_run, stage: str, adata) -> None:
    """Log what the stage declares it reports (``SPEC.metrics``) on its stage run."""
    scalars, series = SPECS[stage].report(adata)
    for key, values, steps in series:
        stage_run.log_steps(key, values, steps=steps)
    stage_run.log_metrics(scalars)


def run(cfg: Mapping[str, Any], run_dir: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Run the four stages as configured; return the headline metrics (and the MLflow run id).

    ``cfg`` is the resolved config as plain containers (``OmegaConf.to_container(cfg, resolve=True)``).
    """
    validate(cfg)
    cfg = complete(cfg)  # every group with its declared defaults: no default is restated below
    # factorize.dask.scheduler: every stage's passes over a chunked X (data.backend=dask) run there
    dask_cfg = cfg["factorize"]["dask"] or {}
    with _sigterm_as_interrupt(), _dask_scheduler(dask_cfg.get("scheduler")):
        if cfg["data"].get("backend") == "dask" and dask_cfg.get("release_memory", True):
            _release_freed_memory()
        return _run(cfg, Path(run_dir), overrides)


def _release_freed_memory() -> None:
    """Passes over chunks free blocks of a few MB per thread and iteration: hand them back to
    the system at once (tardis_exp/heap.py; a cluster's workers get it from their nanny)."""
    from .heap import release_freed_memory

    log.debug("malloc thresholds at 64 kB: %s", release_freed_memory())


def _dask_scheduler(scheduler):
    if scheduler in (None, ""):
        return contextlib.nullcontext()
    from .chunked import dask_scheduler

    return dask_scheduler(scheduler)


def _run(cfg, run_dir: Path, overrides) -> dict[str, Any]:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise disk_error(e, run_dir.parent, "create the run folder") from e
    progress = cfg.get("progress")
    safe_cfg = redact_tree(cfg)  # credentials never reach the run dir or MLflow
    _atomic_write_text(yaml.safe_dump(safe_cfg, sort_keys=False), run_dir / "config.yaml")
    _atomic_write_text("\n".join(redact(o) for o in (overrides or [])) + "\n", run_dir / "overrides.txt")

    tracker = Tracker.from_config(cfg["tracking"])
    tags = {"tardis_exp.version": __version__, "git_commit": _git_commit(), "data.name": cfg["data"].get("name")}
    with tracker.run(tags=tags, local_dir=run_dir, overrides=overrides) as parent:
        # the science only: paths, tracking and progress settings are in config.yaml
        parent.log_params(science_params(safe_cfg))
        parent.log_artifact(run_dir / "config.yaml")
        parent.log_artifact(run_dir / "overrides.txt")

        # content-keyed reuse of the input's digests and of preprocess/factorize/consensus results
        # (sweeps); a no-op when disabled. A sweep trial whose preprocessing is cached
        # never reads the raw data.
        cache = StageCache.from_config(cfg.get("cache"))
        data = cache.load_input(cfg, load=lambda: load_data(cfg["data"]))
        shape = f"{data.shape[0]}x{data.shape[1]}"
        parent.set_tags({"data.digest": data.digest, "data.shape": shape,
                         **({"cache.input": "hit"} if data.from_memo else {})})
        if data.samples:  # a study of several samples: each one is an input of the run
            parent.set_tags({"data.sample_key": cfg["data"]["sample_key"], "data.n_samples": str(len(data.samples))})
            for s in data.samples:
                tracker.log_input((s["n_obs"], s["n_vars"]), name=s["name"], digest=s["digest"], source=s["source"])
        else:
            tracker.log_input(data.shape, name=str(cfg["data"].get("name")), digest=data.digest,
                              source=str(cfg["data"].get("path") or cfg["data"]["source"]))

        # the stages that finished, and their AnnData: kept in the run folder when a later one fails
        done: dict[str, Any] = {"finished": [], "adata": None}
        inputs = [data]
        del data  # _stages frees the raw counts after preprocessing
        try:
            adata = _stages(cfg, tracker, cache, inputs, progress, done)
        except Exception as e:  # noqa: BLE001 -- re-raised, after keeping what was finished
            _keep_partial(e, done, run_dir, cfg)
            raise
        metrics = headline_metrics(adata)
        if cache.enabled:
            metrics.update(cache_hits=float(cache.hits), cache_misses=float(cache.misses))
        if cache.unreadable:  # other users' entries skipped (and warned about) in a shared cache
            parent.set_tags({"cache.unreadable": str(len(cache.unreadable))})
        parent.log_metrics(metrics)
        parent.set_tags({"mlflow.note.content": _description(cfg, overrides, metrics, tracker)})
        _write_outputs(adata, run_dir, cfg, parent)
    metrics["mlflow_run_id"] = parent.run_id
    _atomic_write_text(yaml.safe_dump(metrics, sort_keys=False),
                       run_dir / "metrics.yaml")
    return metrics


def _stages(cfg, tracker, cache, inputs: list, progress, done: dict):
    """preprocess -> factorize -> consensus -> score, each in its MLflow stage run; ``done``
    receives the AnnData after preprocessing and the name of every stage that finished.
    ``inputs`` holds the loaded data, taken out so that no frame keeps the raw counts
    once preprocessing is done."""
    data = inputs.pop()
    with tracker.stage("preprocess", cfg["preprocess"]) as st:
        adata = cache.preprocess(data, cfg, stage_run=st,
                                 compute=lambda a: preprocess(a, sample_key=cfg["data"]["sample_key"],
                                                              **stage_kwargs(cfg["preprocess"])))
        _report(st, "preprocess", adata)
    del data  # the raw counts: free them before the factorization needs the memory
    done.update(adata=adata, finished=["preprocess"])

    # the store opened on its own thread while the data loaded; a store that cannot be
    # used must fail the run here, before the factorization, not after it
    tracker.wait_ready()
    with tracker.stage("factorize", cfg["factorize"]) as st:
        check_shape(cfg, adata.shape)  # ranks, K ranges and memory against the data, before any fit
        cache.factorize(adata, cfg, stage_run=st,
                        compute=lambda a: factorize(a, progress=progress, **stage_kwargs(cfg["factorize"])))
        # one key, one meaning (tracking.METRIC_KEYS): series under *_by_replicate,
        # reconstruction_error is the best replicate's here as on the parent
        _report(st, "factorize", adata)
    done["finished"].append("factorize")

    with tracker.stage("consensus", cfg["consensus"]) as st:
        cache.consensus(adata, cfg, stage_run=st,
                        compute=lambda a: consensus(a, progress=progress, **stage_kwargs(cfg["consensus"])))
        # per-K curves under *_by_k (step = K); the headline keys hold the chosen K's values
        _report(st, "consensus", adata)
    done["finished"].append("consensus")

    with tracker.stage("score", cfg["score"]) as st:
        # data.sample_key: several samples as one study (Moran's I per section, the samples table)
        score(adata, sample_key=cfg["data"]["sample_key"], **stage_kwargs(cfg["score"]))
        _report(st, "score", adata)
    done["finished"].append("score")
    return adata


PARTIAL = "partial_result.h5ad"


def _results_only(adata, X=None, layers=None) -> ad.AnnData:
    """What the stages wrote, in a new AnnData (``save_result=results``): the input matrices
    are the same in every trial of a sweep (and in the stage cache), so X and the layers are
    left out unless given."""
    return ad.AnnData(X=X, obs=adata.obs.copy(), var=adata.var.copy(), obsm=dict(adata.obsm),
                      varm=dict(adata.varm), obsp=dict(adata.obsp), layers=layers or {}, uns=dict(adata.uns))


def _keep_partial(e: Exception, done: Mapping[str, Any], run_dir: Path, cfg) -> None:
    """After a stage failed: write what the finished stages computed to ``partial_result.h5ad``
    in the run folder and say so in the error's message (the error is re-raised by the caller).

    Only once the factorization finished (the expensive part); preprocessing alone is quick
    to redo (and the stage cache keeps it when enabled). The failed stage's own keys, if it
    wrote some before failing, are left out; ``uns['tardis_exp_partial']`` names the
    finished stages and the failure. ``save_result`` chooses the form (``results``: without
    X and layers; ``none``: nothing kept). A keep that fails itself is logged, never masks
    the stage's error.
    """
    adata, finished = done.get("adata"), list(done.get("finished") or [])
    mode = result_mode(cfg)
    if adata is None or "factorize" not in finished or mode == "none":
        return
    failed = ORDER[len(finished)] if len(finished) < len(ORDER) else None
    path = run_dir / PARTIAL
    try:
        # a copy whose keys can be dropped: the failed stage's own are not kept
        saved = _results_only(adata, X=None if mode == "results" else adata.X,
                              layers={} if mode == "results" else dict(adata.layers))
        if failed is not None:
            for out in SPECS[failed].writes:
                if out.key == "*" or out.slot in ("X", "var"):
                    continue
                slot = getattr(saved, out.slot)
                for key in [k for k in slot.keys() if out.matches(k)]:
                    del slot[key]
        saved.uns["tardis_exp_partial"] = {"finished": finished, "failed": failed or "",
                                           "error": redact(f"{type(e).__name__}: {e}")[:2000]}
        _atomic_write_h5ad(saved, path)
    except Exception as keep_error:  # noqa: BLE001 -- the stage's error is the one to report
        log.warning("could not keep the finished stages in %s: %s", path, keep_error)
        return
    note = f"the finished stages ({', '.join(finished)}) are kept in {path}"
    log.warning("%s failed; %s", failed or "the run", note)
    if len(e.args) == 1 and isinstance(e.args[0], str):
        e.args = (f"{e.args[0]}; {note}",)  # the one error line says where they are
    elif hasattr(e, "add_note"):
        e.add_note(note)


def _description(cfg, overrides, metrics, tracker) -> str:
    """The parent run's MLflow description: command line, overrides, headline result."""
    t = cfg["tracking"]
    tags = t.get("tags") or {}
    study = tags.get("optuna_study")
    return run_description(overrides, metrics, data=str(cfg["data"].get("name")),
                           study=None if study is None else str(study), study_run=t.get("parent_run_id"),
                           experiment_id=tracker.experiment_id, trial=tags.get("optuna_trial"))


def _write_outputs(adata, run_dir: Path, cfg, parent) -> None:
    k = ResultKeys()  # the pipeline writes under the stages' default keys
    table = adata.uns[k.score.programs]
    _atomic_write(run_dir / "programs.tsv", lambda tmp: table.to_csv(tmp, sep="\t", index=False))
    U = adata.obsm[k.consensus.usage]
    usages = pd.DataFrame(U, index=adata.obs_names, columns=[f"program_{i}" for i in range(U.shape[1])])
    background = adata.obsm.get(k.consensus.background)
    if background is not None:  # the shared background (consensus.background_ratio), after the programs
        usages = usages.join(pd.DataFrame(np.asarray(background), index=adata.obs_names,
                                          columns=[f"background_{i}" for i in range(background.shape[1])]))
        genes = top_genes_table(np.asarray(adata.uns[k.consensus.uns]["background_spectra"], dtype=np.float64),
                                adata.var_names, cfg["score"]["n_cluster_genes"], "loading")
        genes = genes[["program", "rank", "gene", "loading"]]
        genes = genes.rename(columns={"program": "background"})
        _atomic_write(run_dir / "background.tsv", lambda tmp: genes.to_csv(tmp, sep="\t", index=False))
    gz = {"method": "gzip", "compresslevel": GZIP_LEVEL}
    _atomic_write(run_dir / "usages.tsv.gz", lambda tmp: usages.to_csv(tmp, sep="\t", compression=gz))
    parent.log_artifact(run_dir / "programs.tsv")
    parent.log_artifact(run_dir / "usages.tsv.gz")
    if k.score.samples in adata.uns:  # data.sample_key: programs x samples (score.sample_table)
        by_sample = sample_table(adata, k.score.prefix)
        _atomic_write(run_dir / "programs_by_sample.tsv", lambda tmp: by_sample.to_csv(tmp, sep="\t", index=False))
        parent.log_artifact(run_dir / "programs_by_sample.tsv")
    if background is not None:
        parent.log_artifact(run_dir / "background.tsv")
    mode = result_mode(cfg)
    if mode != "none":
        _atomic_write_h5ad(adata if mode == "full" else _results_only(adata), run_dir / "result.h5ad")
        if cfg["tracking"]["log_result"]:
            parent.log_artifact(run_dir / "result.h5ad")
    if cfg["tracking"]["log_plots"]:
        from .plots import make_plots

        # drawn in a temporary folder, renamed when complete: no half set of figures
        plot_dir = run_dir / "plots"
        tmp = run_dir / f".plots.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            make_plots(adata, tmp)
            shutil.rmtree(plot_dir, ignore_errors=True)
            os.replace(tmp, plot_dir)
        except OSError as e:
            raise disk_error(e, run_dir, "draw the figures") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        parent.log_artifact(plot_dir, "plots")
    if parent.tracker.enabled:  # the programs as an MLflow model (artifact 'programs')
        from .model import log_programs_model

        log_programs_model(adata, run_dir, cfg, parent)
