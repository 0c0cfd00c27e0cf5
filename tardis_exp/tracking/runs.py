"""The handle on one MLflow run (:class:`StageRun`) that the pipeline and the stages log to.

A :class:`StageRun` is what the code that computes sees of tracking: ``log_metric``,
``log_params``, ``log_artifact``, ... on a stage's or the parent's run, every call safe to
make and returning at once. It buffers metrics and hands everything else to its
:class:`~tardis_exp.tracking.Tracker`, which queues the store calls on its store thread
(``tracker.py``). Kept apart from the tracker so the pipeline-facing interface reads on
its own page.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .naming import flatten

if TYPE_CHECKING:
    from .tracker import Tracker

# the package's logger, as before the split into modules: log filters and tests name it
log = logging.getLogger("tardis_exp.tracking")


class StageRun:
    """Handle on one MLflow run (a stage or the parent); every call is safe to make.

    Calls are queued for the tracker's store thread and return at once. Metrics are
    buffered and sent in one batch when the run ends (or fails, or :meth:`flush` is
    called): each store call costs milliseconds, a batch costs one. :attr:`run_id` waits
    for the store; it is ``None`` when tracking is disabled or the run could not be
    created (which was warned about).
    """

    def __init__(self, tracker: "Tracker", active: bool):
        self.tracker = tracker
        self.active = active  # False: tracking disabled, every call is a no-op
        self._id: str | None = None  # set on the store thread once the run exists
        self.metrics: dict[str, float] = {}
        self._pending: list[tuple[str, float, int]] = []

    @property
    def run_id(self) -> str | None:
        """The MLflow run id (waits for the queued store calls)."""
        if self.active:
            self.tracker.drain()
        return self._id

    def flush(self) -> None:
        """Send the buffered metrics now."""
        pending, self._pending = self._pending, []
        if pending:
            self.tracker._metric_batch(self, pending)

    def log_metric(self, key: str, value, step: int | None = None) -> None:
        if value is None:
            return
        value = float(value)
        if step is None:
            self.metrics[key] = value
        if self.active:
            self._pending.append((key, value, int(step or 0)))

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Scalar metrics at step 0, in one call to the store."""
        vals = {}
        for k, v in metrics.items():
            try:
                vals[k] = float(v)
            except (TypeError, ValueError):  # a label, not a number: a caller's slip, not a reason to fail
                log.warning("metric %s=%r is not a number; not logged", k, v)
        self.metrics.update(vals)
        if self.active:
            self._pending.extend((k, v, 0) for k, v in vals.items())

    def log_steps(self, key: str, values: Iterable, steps: Iterable[int] | None = None) -> None:
        """One metric history: ``values[i]`` at ``steps[i]`` (default 0, 1, ...)."""
        values = [float(v) for v in values]
        steps = [int(s) for s in steps] if steps is not None else list(range(len(values)))
        if len(steps) != len(values):
            raise ValueError(f"metric {key}: {len(values)} values but {len(steps)} steps")
        if self.active:
            self._pending.extend((key, v, s) for v, s in zip(values, steps))

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.tracker._params(self, flatten(params))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        self.tracker._artifact(self, path, artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.tracker._text(self, text, name)

    def register_model(self, name: str, artifact_path: str) -> None:
        """Register the model logged at ``artifact_path`` in the Model Registry as ``name``."""
        self.tracker._register(self, name, artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.tracker._tags(self, tags)
