"""MLflow logging for one training trial, done natively from rank 0.

Ray's MLflow callbacks open a new run after every restore; here a trial keeps one run: its id
is stored in the checkpoint and given back to :class:`RunLogger` on resume, which continues
that run and never logs a (metric, step) pair twice. Metrics are buffered and delivered by a
daemon thread (``MlflowClient.log_batch``), so training never waits on the tracking server;
while the server is down the thread retries with capped backoff and keeps the points (the
oldest dropped beyond ``buffer_limit``). Only :meth:`RunLogger.close` reports undelivered data.

MLflow's HTTP client retries for minutes by default: unless the user set them,
``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` and ``..._TIMEOUT`` are set low (process-wide, in
``os.environ``) so that this module's retry loop is the one in charge.
"""

from __future__ import annotations

import itertools
import logging
import numbers
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from orchestrator.names import PARENT_RUN_TAG
from orchestrator.tracking.runs import resolve_tracking_uri

log = logging.getLogger(__name__)

__all__ = ["HTTP_DEFAULTS", "TERMINAL_STATUSES", "RunLogger", "TrackingError"]

MAX_METRICS_PER_BATCH = 1000  # mlflow.utils.validation.MAX_METRICS_PER_BATCH
MAX_PARAMS_PER_BATCH = 100  # mlflow.utils.validation.MAX_PARAMS_TAGS_PER_BATCH
MAX_PARAM_VALUE_LENGTH = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_TAG_VALUE_LENGTH = 8000  # mlflow.utils.validation.MAX_TAG_VAL_LENGTH
TERMINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_ARTIFACT_RETRIES = 2
_WARN_EVERY_S = 30.0
T = TypeVar("T")


class TrackingError(RuntimeError):
    """The tracking server refused a request or could not be reached in time."""


def _is_permanent(exc: BaseException) -> bool:
    """A 4xx answer (other than 429) will not change on retry; anything else might."""
    if isinstance(exc, MlflowException):
        code = exc.get_http_status_code()
        return 400 <= code < 500 and code != 429
    return False


def _chunks(items: Sequence[T], size: int) -> list[Sequence[T]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


@dataclass(frozen=True, slots=True)
class _Point:
    seq: int
    key: str
    value: float
    timestamp: int
    step: int


class RunLogger:
    """One MLflow run of a trial: created, or resumed by ``run_id``; thread-safe.

    Args:
        tracking_uri: see :func:`resolve_tracking_uri`.
        experiment: experiment name (the sweep); created if missing.
        run_id: resume this run (status back to RUNNING) instead of creating one.
        run_name, tags, parent_run_id: for a new run (``tags`` are also set on resume).
        artifact_location: for a new experiment (default: MLflow's).
        flush_interval_s: how often the background thread delivers buffered metrics.
        max_retries: retries of synchronous calls (setup, params) before TrackingError.
        max_backoff_s: cap of the exponential backoff between delivery attempts.
        buffer_limit: most points kept while undelivered; beyond it the oldest are dropped.
    """

    def __init__(
        self,
        tracking_uri: str | None = None,
        experiment: str = "Default",
        *,
        run_id: str | None = None,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        artifact_location: str | None = None,
        flush_interval_s: float = 2.0,
        max_retries: int = 4,
        max_backoff_s: float = 30.0,
        buffer_limit: int = 100_000,
    ) -> None:
        if buffer_limit < 1 or flush_interval_s <= 0 or max_retries < 0:
            raise ValueError("buffer_limit >= 1, flush_interval_s > 0 and max_retries >= 0")
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self._client = MlflowClient(self.tracking_uri)
        self._interval = flush_interval_s
        self._max_retries = max_retries
        self._max_backoff = max_backoff_s
        self._buffer_limit = buffer_limit
        self._cond = threading.Condition()  # guards all state below
        self._buffer: deque[_Point] = deque()
        self._seq = self._failures = self._waiters = 0
        self._accepted: dict[str, int] = {}  # highest step buffered this session, per key
        self._server_max: dict[str, int] = {}  # highest step known to be on the server, per key
        self._needs_lookup: set[str] = set()  # keys whose server history must be read first
        self._counts = {"delivered": 0, "dropped": 0, "skipped": 0}
        self._next_attempt = 0.0
        self._kick = self._stop = self._closed = False
        self._last_warn: dict[str, float] = {}

        exp_id = self._retry(
            lambda: self._experiment_id(experiment, artifact_location), "experiment"
        )
        all_tags = {str(k): str(v)[:MAX_TAG_VALUE_LENGTH] for k, v in (tags or {}).items()}
        if parent_run_id:
            all_tags[PARENT_RUN_TAG] = parent_run_id
        if run_id is None:
            run = self._retry(
                lambda: self._client.create_run(exp_id, run_name=run_name, tags=all_tags), "new run"
            )
        else:
            run = self._retry(lambda: self._client.get_run(run_id), f"run {run_id}")
            if run.info.lifecycle_stage == "deleted":
                raise TrackingError(f"run {run_id} is deleted and cannot be resumed")
            if run.info.experiment_id != exp_id:
                log.warning("run %s is not in experiment %r", run_id, experiment)
            self._retry(lambda: self._client.update_run(run_id, status="RUNNING"), "resume")
            if all_tags:
                tag_list = [RunTag(k, v) for k, v in all_tags.items()]
                for chunk in _chunks(tag_list, MAX_PARAMS_PER_BATCH):
                    self._retry(lambda c=chunk: self._client.log_batch(run_id, tags=c), "tags")
            self._needs_lookup = set(run.data.metrics)  # only keys with a history
        self._run_id: str = run.info.run_id
        log.info("MLflow run %s at %s (resumed: %s)", self._run_id, self.tracking_uri, bool(run_id))
        self._thread = threading.Thread(
            target=self._loop, name=f"mlflow-{self._run_id[:8]}", daemon=True
        )
        self._thread.start()

    # -- public API -------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        """The MLflow run id (store it in the checkpoint to resume the same run)."""
        return self._run_id

    def stats(self) -> dict[str, int]:
        """Counts of metric points: delivered, pending, dropped (overflow), skipped (dup steps)."""
        with self._cond:
            return {**self._counts, "pending": len(self._buffer)}

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a flat dict of params (values stringified, truncated to MLflow's limit).

        Params already on the run with the same value are skipped (so a resumed trial may log
        its config again); a changed value raises ValueError naming the keys, since MLflow
        params are immutable. Synchronous, with retries; TrackingError if the server is down.
        """
        new = {str(k): str(v)[:MAX_PARAM_VALUE_LENGTH] for k, v in params.items()}
        existing = self._retry(lambda: self._client.get_run(self._run_id).data.params, "params")
        changed = sorted(k for k, v in new.items() if k in existing and existing[k] != v)
        if changed:
            detail = "; ".join(f"{k!r}: {existing[k][:80]!r} -> {new[k][:80]!r}" for k in changed)
            raise ValueError(f"params are immutable in MLflow, already logged: {detail}")
        todo = [Param(k, v) for k, v in new.items() if k not in existing]
        for chunk in _chunks(todo, MAX_PARAMS_PER_BATCH):
            self._retry(lambda c=chunk: self._client.log_batch(self._run_id, params=c), "params")

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Buffer ``metrics`` at optimizer step ``step``; returns at once, never raises for
        tracking problems. Per key, a step not above the last one logged (this session or,
        after a resume, on the server) is skipped, so no (key, step) is logged twice."""
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        step, now_ms = int(step), int(time.time() * 1000)
        with self._cond:
            if self._closed:
                self._warn("closed", "log_metrics after close() ignored (step %d)", step)
                return
            for k, raw in metrics.items():
                key = str(k)
                try:
                    value = float(raw)
                except (TypeError, ValueError):
                    self._warn(f"value:{key}", "metric %r: %r is not a number, skipped", key, raw)
                    continue
                last = self._accepted.get(key)
                if last is not None and step <= last:
                    self._counts["skipped"] += 1
                    continue
                self._accepted[key] = step
                self._seq += 1
                self._buffer.append(_Point(self._seq, key, value, now_ms, step))
            while len(self._buffer) > self._buffer_limit:
                self._buffer.popleft()
                self._counts["dropped"] += 1
                self._warn("dropped", "buffer full: %d oldest dropped", self._counts["dropped"])

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> bool:
        """Upload a file or directory (a few retries); False and a warning on failure."""
        path = str(local_path)
        return self._try_artifact(
            lambda: self._client.log_artifact(self.run_id, path, artifact_path), path
        )

    def log_text(self, text: str, artifact_file: str) -> bool:
        """Store ``text`` as the artifact ``artifact_file``; False and a warning on failure."""
        fn = self._client.log_text
        return self._try_artifact(lambda: fn(self._run_id, text, artifact_file), artifact_file)

    def log_dict(self, dictionary: dict[str, Any], artifact_file: str) -> bool:
        """Store ``dictionary`` as JSON/YAML artifact; False and a warning on failure."""
        fn = self._client.log_dict
        return self._try_artifact(
            lambda: fn(self._run_id, dictionary, artifact_file), artifact_file
        )

    def flush(self, timeout: float | None = None) -> bool:
        """Deliver everything logged so far; True once delivered, False at ``timeout``.

        Starts an attempt at once, even while backing off from an outage; while a flush waits,
        failed attempts are repeated every second at most.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._seq
            self._kick = True
            self._waiters += 1
            self._cond.notify_all()
            try:
                while self._buffer and self._buffer[0].seq <= target:
                    left = 1.0 if deadline is None else deadline - time.monotonic()
                    if left <= 0 or not self._thread.is_alive():
                        return False
                    self._cond.wait(min(left, 1.0))
                return True
            finally:
                self._waiters -= 1

    def close(self, status: str = "FINISHED", timeout: float | None = 60.0) -> None:
        """Flush (up to ``timeout``), stop the thread and set the run's terminal status.

        Raises TrackingError if points were still undelivered at the timeout or the status
        could not be set. Idempotent.
        """
        if status not in TERMINAL_STATUSES:
            raise ValueError(f"status must be one of {TERMINAL_STATUSES}, got {status!r}")
        with self._cond:
            if self._closed:
                return
            self._closed = True
        delivered = self.flush(timeout)
        with self._cond:
            self._stop = True
            pending = len(self._buffer)
            self._cond.notify_all()
        self._thread.join(timeout=5.0)  # a daemon: never blocks exit
        errors = []
        if not delivered:
            errors.append(f"{pending} metric points not delivered within {timeout} s")
        try:
            retries = self._max_retries if delivered else 0  # server evidently down: one try
            self._retry(lambda: self._client.set_terminated(self._run_id, status), "end", retries)
        except TrackingError as exc:
            errors.append(str(exc))
        if errors:
            raise TrackingError(f"MLflow run {self._run_id}: " + "; ".join(errors))

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """FINISHED (raising TrackingError if undelivered), or FAILED/KILLED on an exception
        (then a tracking error is only logged, never masks the original one)."""
        if exc_type is None:
            return self.close("FINISHED")
        try:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        except TrackingError:
            log.exception("while closing the MLflow run after an error")

    # -- internals --------------------------------------------------------------------------

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        exp = self._client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self._client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException as exc:  # created meanwhile by another trial
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self._client.get_experiment_by_name(name)
        if exp is None or exp.lifecycle_stage == "deleted":
            raise TrackingError(f"experiment {name!r} is deleted: restore or rename it")
        return exp.experiment_id

    def _backoff(self, failures: int) -> float:
        return min(self._max_backoff, 0.5 * 2 ** min(failures - 1, 16))

    def _retry(self, fn: Callable[[], T], what: str, retries: int | None = None) -> T:
        """Call ``fn`` with exponential backoff; TrackingError once retries are spent."""
        attempts = (self._max_retries if retries is None else retries) + 1
        for attempt in range(1, attempts + 1):
            try:
                return fn()
            except TrackingError:
                raise
            except Exception as exc:
                if _is_permanent(exc) or attempt == attempts:
                    msg = f"MLflow {what} at {self.tracking_uri} failed ({attempt} tries): {exc}"
                    raise TrackingError(msg) from exc
                log.warning("MLflow %s failed (attempt %d/%d): %s", what, attempt, attempts, exc)
                time.sleep(self._backoff(attempt))
        raise AssertionError("unreachable")

    def _try_artifact(self, fn: Callable[[], None], name: str) -> bool:
        try:
            self._retry(fn, f"artifact {name}", retries=_ARTIFACT_RETRIES)
            return True
        except TrackingError as exc:
            log.warning("%s: not logged", exc)
            return False

    def _warn(self, key: str, msg: str, *args: Any) -> None:
        """Log a warning at most once per ``_WARN_EVERY_S`` for each ``key``."""
        now = time.monotonic()
        if now - self._last_warn.get(key, -_WARN_EVERY_S) >= _WARN_EVERY_S:
            self._last_warn[key] = now
            log.warning(msg, *args)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stop:
                        return
                    now = time.monotonic()
                    if self._buffer and (self._kick or now >= self._next_attempt):
                        break
                    wake = self._next_attempt if self._buffer else now + self._interval
                    self._cond.wait(max(0.01, wake - now))
                self._kick = False
            self._drain()

    def _drain(self) -> None:
        """Deliver batches until the buffer is empty or an attempt fails."""
        while True:
            with self._cond:
                if not self._buffer or self._stop:
                    self._next_attempt = time.monotonic() + self._interval
                    return
                batch = list(itertools.islice(self._buffer, MAX_METRICS_PER_BATCH))
                lookups = {p.key for p in batch} & self._needs_lookup
            try:
                for key in lookups:
                    history = self._client.get_metric_history(self._run_id, key)
                    top = max((m.step for m in history), default=None)
                    with self._cond:
                        if top is not None:
                            self._server_max[key] = max(top, self._server_max.get(key, top))
                        self._needs_lookup.discard(key)
                send = [p for p in batch if p.step > self._server_max.get(p.key, p.step - 1)]
                self._send(send)
            except Exception as exc:
                with self._cond:
                    # A failed request may still have been applied: re-read those keys first.
                    self._needs_lookup.update(p.key for p in batch)
                    self._failures += 1
                    delay = self._backoff(self._failures)
                    if self._waiters:
                        delay = min(delay, 1.0)
                    self._next_attempt = time.monotonic() + delay
                    n, uri = len(self._buffer), self.tracking_uri
                    self._warn(
                        "outage", "MLflow at %s unreachable, %d points kept: %s", uri, n, exc
                    )
                return
            with self._cond:
                while self._buffer and self._buffer[0].seq <= batch[-1].seq:
                    self._buffer.popleft()
                self._counts["delivered"] += len(send)
                self._counts["skipped"] += len(batch) - len(send)
                if self._failures:
                    log.info("MLflow back after %d failed attempts", self._failures)
                    self._failures = 0
                    self._last_warn.pop("outage", None)
                self._cond.notify_all()

    def _send(self, points: list[_Point]) -> None:
        """log_batch; a refused (4xx) batch is sent again key by key, so that one bad key
        loses only its own points."""
        if not points:
            return
        metrics = [Metric(p.key, p.value, p.timestamp, p.step) for p in points]
        try:
            self._client.log_batch(self._run_id, metrics=metrics, synchronous=True)
            return
        except Exception as exc:
            if not _is_permanent(exc):
                raise
        for key in dict.fromkeys(m.key for m in metrics):
            try:
                part = [m for m in metrics if m.key == key]
                self._client.log_batch(self._run_id, metrics=part, synchronous=True)
            except Exception as exc:
                if not _is_permanent(exc):
                    raise
                log.error("MLflow refused metric %r (%d points dropped): %s", key, len(part), exc)
