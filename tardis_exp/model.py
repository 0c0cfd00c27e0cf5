"""A run's programs as an MLflow pyfunc model: counts in, usages out.

Every tracked run logs one under the artifact path ``programs`` of its parent run::

    model = mlflow.pyfunc.load_model("runs:/<run_id>/programs")
    usages = model.predict(counts)  # DataFrame: spots x genes (gene names as columns)

``predict`` returns one column per program (``program_0`` ...), the same usages as
:func:`tardis_exp.project.project` on the same counts: both call
:meth:`tardis_exp.project.Programs.usages` (the run's normalization over its genes, then
non-negative least squares on the fixed spectra). A run with ``preprocess.batch_correction``
brings each input onto its genes' means over its samples (``batch_mean``, as ``project``
does): ``predict`` takes one section at a time. The model's artifacts are the spectra,
the gene list, those means and the preprocessing parameters (``programs.npz``,
``programs.json``); the class lives in the installed package, so no ``code_paths`` are logged.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd

from .project import Programs

log = logging.getLogger(__name__)

ARTIFACT_PATH = "programs"
_EXAMPLE_SPOTS = 5


class ProgramsModel(mlflow.pyfunc.PythonModel):
    """Usages of new spots on a run's fixed programs (MLflow pyfunc).

    Parameters
    ----------
    programs
        Set only to predict before saving (the signature); a loaded model reads its
        programs from the ``programs`` artifact in :meth:`load_context`.
    """

    def __init__(self, programs: Programs | None = None):
        self._programs = programs

    def load_context(self, context):
        self._programs = Programs.load(Path(context.artifacts["programs"]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Usages (spots x programs DataFrame) of ``model_input``: counts of one section, spots
        x genes, gene names as columns (genes the run does not know are ignored); the run's
        batch correction, if any, is repeated on the input as one section."""
        df = pd.DataFrame(model_input)
        X = df.to_numpy(dtype=np.float64)
        U, *_ = self._programs.usages(X, df.columns.astype(str))
        return pd.DataFrame(U.astype(np.float64), index=df.index,
                            columns=[f"program_{i}" for i in range(U.shape[1])])


@contextmanager
def _quiet():
    """MLflow's notes while saving (the CloudPickle warning, the input-example check and its
    download progress bar) stay out of a run's console: the model is our own class."""
    logger = logging.getLogger("mlflow")
    level, bar = logger.level, os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    logger.setLevel(logging.ERROR)
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    try:
        yield
    finally:
        logger.setLevel(level)
        if bar is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = bar


def save_programs_model(programs: Programs, path: str | Path, example: pd.DataFrame) -> Path:
    """Save ``programs`` as a pyfunc model folder at ``path`` (replaced if present).

    ``example`` (a few spots' counts over the run's genes) is the input example; the
    signature is inferred from it and its prediction, with every gene optional (the new
    data may lack some: :meth:`Programs.align` reports their weight).
    """
    from mlflow.models import infer_signature
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from . import __version__

    path = Path(path)
    # saved beside, renamed when complete: a full disk never leaves half a model folder
    part = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(part, ignore_errors=True)
    sig = infer_signature(example, ProgramsModel(programs).predict(None, example))
    inputs = Schema([ColSpec(c.type, c.name, required=False) for c in sig.inputs.inputs])
    try:
        with tempfile.TemporaryDirectory(prefix="tardis_exp_model_") as tmp, _quiet():
            files = Path(tmp) / "programs"
            programs.save(files)
            mlflow.pyfunc.save_model(
                part, python_model=ProgramsModel(), artifacts={"programs": str(files)},
                signature=ModelSignature(inputs=inputs, outputs=sig.outputs), input_example=example,
                # the class is in this package: no inferred requirements (slow), no code_paths
                pip_requirements=[f"tardis-exp=={__version__}", f"mlflow=={mlflow.__version__}"],
            )
        shutil.rmtree(path, ignore_errors=True)
        os.replace(part, path)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return path


def _example(adata, genes: pd.Index) -> pd.DataFrame:
    """The first spots' counts over the run's genes (the preprocessed data's ``counts`` layer)."""
    import scipy.sparse as sp

    M = adata.layers["counts"] if "counts" in adata.layers else adata.X
    M = M[:_EXAMPLE_SPOTS]
    M = M.toarray() if sp.issparse(M) else np.asarray(M)
    return pd.DataFrame(M.astype(np.float64), index=[str(i) for i in adata.obs_names[:_EXAMPLE_SPOTS]],
                        columns=list(genes))


def log_programs_model(adata, run_dir: Path, cfg, parent) -> None:
    """Save the run's programs model in ``run_dir/programs`` and log it as the parent's
    artifact ``programs``; with ``tracking.register_model=<name>``, register it.

    Tracking only (a disabled tracker does nothing). A failure is a warning and a record
    in the tracker's failures (``tracking_errors.log``), as for every tracking call: the
    run and its folder are kept.
    """
    tracker = parent.tracker
    if not tracker.enabled:
        return
    try:
        programs = Programs.from_result(adata, cfg, str(run_dir))
        path = save_programs_model(programs, run_dir / ARTIFACT_PATH, _example(adata, programs.genes))
    except Exception as e:  # noqa: BLE001 -- the model is an extra: never lose the run for it
        msg = f"save the programs model: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        tracker.failures.append(msg)
        log.warning("MLflow logging failed (%s); the run continues, local results are kept", msg)
        return
    parent.log_artifact(path, ARTIFACT_PATH)
    name = cfg["tracking"]["register_model"]  # the pipeline's config, completed with the defaults
    if name:
        parent.register_model(str(name), ARTIFACT_PATH)
