"""Heartbeat: keep this worker's RUNNING trials alive and fail the stale trials of dead workers.

RDBStorage implements Optuna's heartbeat (``record_heartbeat`` / ``fail_stale_trials``).
JournalStorage does not (Optuna 5.0), so there the heartbeat is a trial system attribute
holding a unix timestamp, and a RUNNING trial whose last beat is older than ``grace_period``
is failed. Only stale trials are failed, never all RUNNING ones.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Dict, List, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from ._common import FAIL_REASON_ATTR, HEARTBEAT_ATTR

log = logging.getLogger(__name__)


def trial_id(storage: optuna.storages.BaseStorage, study: optuna.Study, number: int) -> int:
    """The storage's id of trial ``number`` (Optuna's public lookup; the id is what storages take)."""
    study_id = storage.get_study_id_from_name(study.study_name)
    return storage.get_trial_id_from_study_id_trial_number(study_id, number)


def stale_callback(study: optuna.Study, trial: FrozenTrial) -> None:
    """RDBStorage's ``heartbeat_stale_trial_callback``: say which trial was failed, and why."""
    log.warning("Trial %d marked FAIL: stale heartbeat (its worker probably died)", trial.number)


class Heartbeat:
    """Beats for the trials this worker runs; fails other workers' stale ones.

    ``storage`` is the storage object the study was created on (Optuna wraps an RDBStorage
    in a cache; heartbeats go to the database itself).
    """

    def __init__(self, study: optuna.Study, storage: optuna.storages.BaseStorage,
                 interval: Optional[int], grace: Optional[int]) -> None:
        self.study = study
        self.storage = storage
        self.interval = interval
        self.grace = grace if grace is not None else (2 * interval if interval else None)
        self.native = (isinstance(storage, optuna.storages.RDBStorage)
                       and storage.get_heartbeat_interval() is not None)
        self._owned: Dict[int, int] = {}  # trial number -> trial id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def enabled(self) -> bool:
        return bool(self.interval)

    def _beat(self, tid: int) -> None:
        try:
            if self.native:
                self.storage.record_heartbeat(tid)
            else:
                self.storage.set_trial_system_attr(tid, HEARTBEAT_ATTR, time.time())
        except optuna.exceptions.UpdateFinishedTrialError:
            return  # told meanwhile: nothing left to keep alive
        except Exception as e:  # noqa: BLE001 -- a missed beat never kills the sweep; the next one may pass
            log.warning("heartbeat for trial id %s failed: %s: %s", tid, type(e).__name__, e)

    def add(self, number: int) -> None:
        if not self.enabled:
            return
        tid = trial_id(self.storage, self.study, number)
        with self._lock:
            self._owned[number] = tid
        self._beat(tid)

    def remove(self, number: int) -> None:
        with self._lock:
            self._owned.pop(number, None)

    def _run(self) -> None:
        assert self.interval
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self._owned.values())
            for tid in ids:
                self._beat(tid)

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="optuna-heartbeat", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def fail_stale(self) -> List[int]:
        """Fail RUNNING trials of dead workers. Returns their numbers."""
        if not self.enabled:
            return []
        if self.native:
            before = self._running()
            optuna.storages.fail_stale_trials(self.study)
            return sorted(before - self._running() - set(self._owned))
        assert self.grace is not None
        now = time.time()
        failed = []
        with self._lock:
            mine = set(self._owned)
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number in mine:
                continue
            last = t.system_attrs.get(HEARTBEAT_ATTR)
            if last is None:
                last = t.datetime_start.timestamp() if t.datetime_start else now
            if now - float(last) <= self.grace:
                continue
            msg = (
                f"stale trial: no heartbeat for {now - float(last):.0f}s "
                f"(grace period {self.grace}s); its worker probably died"
            )
            tid = trial_id(self.storage, self.study, t.number)
            try:
                self.storage.set_trial_system_attr(tid, FAIL_REASON_ATTR, msg)
                if self.storage.set_trial_state_values(tid, state=TrialState.FAIL):
                    failed.append(t.number)
                    log.warning("Trial %d marked FAIL: %s", t.number, msg)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # its worker told it after all, or another worker failed it first
        return failed

    def _running(self) -> set:
        return {t.number for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
