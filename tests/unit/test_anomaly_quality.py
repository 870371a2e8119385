"""Input anomaly detectors against labelled anomalies injected into real electricity demand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from benchmarks.anomaly_quality import (
    TYPES,
    Tally,
    evaluate,
    inject,
    random_window,
    taylor_series,
)
from worker.core import anomalies as an

WINDOWS = 300  # per resolution: ~600 injected anomalies and 300 clean windows
SEED = 7  # not the benchmark's default seed


@pytest.fixture(scope="module", params=[30, 60], ids=["30min", "60min"])
def tally(request: pytest.FixtureRequest) -> Tally:
    """Clean and injected Taylor windows scored at one resolution."""
    return evaluate(WINDOWS, SEED, request.param)


def test_taylor_series_is_the_shipped_demand_data() -> None:
    """pmdarima ships 12 weeks of half-hourly England & Wales demand in MW."""
    y = taylor_series(30)
    assert y.shape == (4032,)
    assert 15_000 < y.min() < y.max() < 45_000
    assert taylor_series(60).shape == (2016,)


def test_injections_are_labelled_as_described() -> None:
    """Injected spans have the documented types, sizes and separations."""
    rng = np.random.default_rng(1)
    series = taylor_series(30)
    for _ in range(50):
        window = random_window(series, 30, rng)
        assert len(window) % 48 == 0 and 7 <= len(window) // 48 <= 14
        injected, labels = inject(window, 30, rng)
        assert 1 <= len(labels) <= 3
        for label in labels:
            span = slice(label.start, label.end + 1)
            ratio = injected[span] / window[span]
            if label.anomaly_type == an.INPUT_SPIKE:
                assert np.allclose(ratio, 1 + label.magnitude) and 0.15 <= label.magnitude <= 0.4
            elif label.anomaly_type == an.INPUT_DROP:
                assert np.allclose(ratio, 1 - label.magnitude) and 0.15 <= label.magnitude <= 0.4
            elif label.anomaly_type == an.INPUT_FLATLINE:
                assert (injected[span] == window[label.start - 1]).all()
                assert 6 <= label.end - label.start + 1 <= 16
            else:
                assert (injected[span] == 0).all()
        starts = sorted((lab.start, lab.end) for lab in labels)
        assert all(b[0] - a[1] > 12 for a, b in itertools.pairwise(starts))


@pytest.mark.parametrize("kind", TYPES)
def test_precision_and_recall_per_type_reach_0_9(tally: Tally, kind: str) -> None:
    """Each input detector has precision and recall of at least 0.9 on real demand."""
    assert tally.injected[kind] >= 50
    assert tally.precision(kind) >= 0.9, (kind, tally.false_positives)
    assert tally.recall(kind) >= 0.9, (kind, tally.missed)


def test_clean_windows_are_rarely_flagged(tally: Tally) -> None:
    """At most 2 % of the clean demand windows get any detection."""
    assert tally.clean_windows == WINDOWS
    assert tally.clean_windows_flagged <= 0.02 * WINDOWS
