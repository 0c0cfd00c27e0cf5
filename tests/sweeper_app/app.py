"""Toy Hydra app used by tests/test_sweeper.py to exercise the tardis_optuna sweeper."""

import json
import math
import os
import time

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict:
    trial = cfg.tracking.tags.get("optuna_trial") if cfg.tracking.tags else None
    n_calls = 0
    if cfg.log_file:
        if os.path.exists(cfg.log_file):
            with open(cfg.log_file) as f:
                n_calls = sum(1 for _ in f)
        with open(cfg.log_file, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "trial": trial, "x": cfg.x, "y": cfg.y,
                                "k": cfg.k, "lo": cfg.lo, "hi": cfg.hi, "kind": cfg.kind}) + "\n")
    # sleep on every call, or only on the call with index `sleep_call` (0-based, per log_file)
    if cfg.sleep and (cfg.sleep_call < 0 or cfg.sleep_call == n_calls):
        time.sleep(cfg.sleep)
    if cfg.consensus.min_clusters > cfg.consensus.max_clusters:
        raise ValueError("invalid config: consensus.min_clusters > consensus.max_clusters")
    if cfg.lo > cfg.hi:
        raise ValueError(f"invalid config: lo={cfg.lo} > hi={cfg.hi}")
    if cfg.fail_if_x_above is not None and cfg.x > cfg.fail_if_x_above:
        raise ValueError(f"x={cfg.x} is above {cfg.fail_if_x_above}")
    if cfg.prune_if_x_below is not None and cfg.x < cfg.prune_if_x_below:
        import optuna

        raise optuna.TrialPruned(f"x={cfg.x} below {cfg.prune_if_x_below}")
    loss = (cfg.x - 0.3) ** 2 + (cfg.y + 0.2) ** 2 + 0.01 * (cfg.k - 7) ** 2
    n_comp = cfg.factorize.n_components
    span = cfg.consensus.max_clusters - cfg.consensus.min_clusters
    metrics = {
        "loss": loss,
        "consensus.cophenetic": 1.0 - abs(cfg.k - 7) / 10.0 - abs(n_comp - 9) / 20.0 - span / 100.0,
        # the conf/sweep presets' objective (tardis_exp.pipeline.headline_metrics)
        "consensus.silhouette": 1.0 - abs(cfg.k - 7) / 10.0 - abs(n_comp - 9) / 20.0 - span / 100.0,
        "consensus.reproducibility": 1.0 - abs(cfg.k - 7) / 10.0 - abs(n_comp - 9) / 20.0 - span / 100.0,
        "reconstruction_error": float(cfg.k) + 10.0 / n_comp,
        "nested": {"score": -loss},
        "nan_metric": math.nan,
    }
    if cfg.tracking.uri and cfg.tracking.parent_run_id:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=cfg.tracking.uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        run = client.create_run(
            exp.experiment_id,
            tags={"mlflow.parentRunId": cfg.tracking.parent_run_id,
                  **{str(k): str(v) for k, v in cfg.tracking.tags.items()}},
        )
        for key in ("x", "y", "k", "lo", "hi"):
            client.log_param(run.info.run_id, key, cfg[key])
        client.log_metric(run.info.run_id, "loss", loss)
        client.set_terminated(run.info.run_id, "FINISHED")
        metrics["mlflow_run_id"] = run.info.run_id
    return metrics


if __name__ == "__main__":
    main()
