"""What the emulator notices about its own traffic: anomalies and per-model prediction logs.

Both live in bounded in-memory buffers (oldest dropped first), so a long run cannot grow memory.
Anomaly ids hash (model, request, kind): a redelivered request does not duplicate an anomaly.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import numpy as np

from qnn_emulator.arrays import FloatArray

SPIKE_Z = 6.0  # robust z beyond which a load reading is flagged
MAD_TO_SIGMA = 1.4826


def utc_now() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Anomaly:
    id: str
    anomaly_type: str
    severity: str
    description: str
    suggested_actions: list[str]
    detected_at: str
    resolved: bool
    resolved_at: str | None
    request_id: str
    model_id: str

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def anomaly_id(model_id: str, request_id: str, anomaly_type: str) -> str:
    digest = hashlib.sha256(f"{model_id}\x1f{request_id}\x1f{anomaly_type}".encode()).hexdigest()
    return f"anm-{digest[:20]}"


def new_anomaly(
    *,
    model_id: str,
    request_id: str,
    anomaly_type: str,
    severity: str,
    description: str,
    suggested_actions: list[str],
) -> Anomaly:
    return Anomaly(
        id=anomaly_id(model_id, request_id, anomaly_type),
        anomaly_type=anomaly_type,
        severity=severity,
        description=description,
        suggested_actions=suggested_actions,
        detected_at=utc_now(),
        resolved=False,
        resolved_at=None,
        request_id=request_id,
        model_id=model_id,
    )


class AnomalyStore:
    """The last `capacity` anomalies, by id, oldest evicted first."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, Anomaly] = OrderedDict()

    def add(self, anomaly: Anomaly) -> None:
        if anomaly.id in self._items:
            return
        self._items[anomaly.id] = anomaly
        while len(self._items) > self._capacity:
            self._items.popitem(last=False)

    def list(self, resolved: bool | None = None) -> list[Anomaly]:
        """Newest first, optionally only resolved or unresolved ones."""
        items = reversed(self._items.values())
        return [a for a in items if resolved is None or a.resolved == resolved]

    def resolve(self, anomaly_id: str) -> Anomaly | None:
        anomaly = self._items.get(anomaly_id)
        if anomaly is not None and not anomaly.resolved:
            anomaly.resolved = True
            anomaly.resolved_at = utc_now()
        return anomaly


class PredictionLog:
    """The last `capacity` predict outcomes per model."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._logs: dict[str, deque[dict[str, object]]] = {}

    def record(
        self,
        model_id: str,
        *,
        request_id: str | None,
        request_type: str | None,
        status_code: int,
        execution_time_ms: float | None,
        cost_usd: float | None,
        fault: str | None = None,
    ) -> None:
        log = self._logs.setdefault(model_id, deque(maxlen=self._capacity))
        log.append(
            {
                "timestamp": utc_now(),
                "request_id": request_id,
                "request_type": request_type,
                "status_code": status_code,
                "execution_time_ms": execution_time_ms,
                "cost_usd": cost_usd,
                "fault": fault,
            }
        )

    def recent(self, model_id: str, limit: int) -> list[dict[str, object]]:
        """Newest first."""
        log = self._logs.get(model_id, deque())
        return list(reversed(log))[:limit]


def _median(values: FloatArray) -> float:
    """np.median without its per-call overhead (this runs on every forecast request)."""
    ordered = np.sort(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[mid])
    return float(ordered[mid - 1] + ordered[mid]) / 2.0


def _spike_severity(z: float) -> str:
    if z >= 12:
        return "critical"
    if z >= 9:
        return "high"
    return "medium"


def load_anomalies(
    residuals: FloatArray, *, history_length: int, model_id: str, request_id: str
) -> list[Anomaly]:
    """Spikes and drops in forecast history: robust z-scores of the seasonal-fit residuals.

    Residuals, not raw values, so that the daily peak is not flagged as a spike every evening.
    """
    if len(residuals) < 10:
        return []
    centre = _median(residuals)
    spread = MAD_TO_SIGMA * _median(np.abs(residuals - centre))
    if spread <= 0:
        return []
    z = (residuals - centre) / spread
    offset = history_length - len(residuals)  # residuals cover the newest part of the history
    found = []
    for kind, mask in (("load_spike", z >= SPIKE_Z), ("load_drop", z <= -SPIKE_Z)):
        idx = np.flatnonzero(mask)
        if idx.size == 0:
            continue
        worst = int(idx[np.argmax(np.abs(z[idx]))])
        worst_z = abs(float(z[worst]))
        word = "spike" if kind == "load_spike" else "drop"
        found.append(
            new_anomaly(
                model_id=model_id,
                request_id=request_id,
                anomaly_type=kind,
                severity=_spike_severity(worst_z),
                description=(
                    f"{idx.size} load {word}(s) in the forecast history; the largest at index "
                    f"{offset + worst} is {worst_z:.1f} robust standard deviations from the "
                    "seasonal fit"
                ),
                suggested_actions=[
                    "Check the meter or feed behind the flagged readings",
                    "Interpolate or drop the flagged readings and re-run the forecast",
                ],
            )
        )
    return found


def slow_execution_anomaly(
    execution_time_ms: float, threshold_ms: float, *, model_id: str, request_id: str
) -> Anomaly | None:
    if execution_time_ms <= threshold_ms:
        return None
    ratio = execution_time_ms / threshold_ms
    severity = "low" if ratio < 2 else "medium" if ratio < 5 else "high"
    return new_anomaly(
        model_id=model_id,
        request_id=request_id,
        anomaly_type="slow_execution",
        severity=severity,
        description=f"execution took {execution_time_ms:.0f} ms (threshold {threshold_ms:.0f} ms)",
        suggested_actions=[
            "Check emulator load and injected latency",
            "Reduce the request size or raise the client timeout",
        ],
    )


def shortfall_anomaly(
    unserved_fraction: float, *, model_id: str, request_id: str
) -> Anomaly | None:
    if unserved_fraction <= 0:
        return None
    severity = (
        "critical"
        if unserved_fraction >= 0.2
        else "high"
        if unserved_fraction >= 0.05
        else "medium"
        if unserved_fraction >= 0.01
        else "low"
    )
    return new_anomaly(
        model_id=model_id,
        request_id=request_id,
        anomaly_type="capacity_shortfall",
        severity=severity,
        description=f"{unserved_fraction:.1%} of the load could not be served by the sources given",
        suggested_actions=[
            "Add supply capacity or demand response for the short steps",
            "Check the load forecast for overestimates",
        ],
    )
