"""The benchmark's own parts that need no broker, database or emulator: the fair ceiling sends
the QNN what eglo sends, both ceilings build the same rows, and the latency curves are tabled and
plotted (issue 15). No timings are asserted."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
import pytest

pytest.importorskip("psutil")  # the bench extra

from benchmarks import api_load, db_ceiling, fair_ceiling
from benchmarks.curves import Curve, CurvePoint, _median_run, format_curves, plot
from benchmarks.fixtures import Fixture
from benchmarks.harness import Latency
from contracts.qnn import build_predict_body
from contracts.requests import request_fingerprint
from contracts.results import ExecutionMetadata
from producers.reader import parse_request
from producers.sample import generate_requests


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _wire(request: Any) -> dict[str, Any]:
    """A request as the consumer receives it (Publisher.publish's body)."""
    loaded: dict[str, Any] = orjson.loads(
        orjson.dumps(request.model_dump(mode="json", exclude_none=True))
    )
    return loaded


def test_fair_ceiling_sends_the_predict_body_eglo_sends() -> None:
    requests = [parse_request(d) for d in generate_requests(40, seed=4, id_prefix="t")]
    assert {r.request_type for r in requests} == {"forecast", "storage", "grid_switch",
                                                  "simulation"}
    for request in requests:
        eglo = build_predict_body(
            request, model_id="PRETRAINED_QNN_GRID_MODEL", mode="quantum", optimization_level=1
        )
        assert fair_ceiling.predict_body(_wire(request)) == _without_nulls(eglo)


def _fixture(request: Any) -> Fixture:
    result = {"value": 1.5}
    execution = {"model_id": "m", "device": "sim", "n_qubits": 4, "circuit_depth": 9,
                 "execution_time_ms": 12.5, "cost_usd": 0.01}
    return Fixture(
        request=request,
        fingerprint=request_fingerprint(request),
        result=result,
        metadata=ExecutionMetadata.model_validate(execution),
        round_trip_ms=21.0,
        outcome_doc={"event_type": "run.completed.x", "result": result, "execution": execution,
                     "run_id": "tpl", "request_id": "tpl", "event_id": "tpl"},
        outcome_key=f"run.completed.{request.request_type}",
        embedding_doc={"event_type": "embedding.requested", "run_id": "tpl"},
    )


def test_fixtures_reach_the_ceilings_processes_intact() -> None:
    request = parse_request(generate_requests(4, seed=4, id_prefix="tpl")[1])
    fixture = _fixture(request)
    again = Fixture.from_json(orjson.loads(orjson.dumps(fixture.to_json())))
    assert again == fixture


def test_both_ceilings_build_the_same_rows() -> None:
    templates = [parse_request(d) for d in generate_requests(4, seed=4, id_prefix="tpl")]
    fixtures = [_fixture(t) for t in templates]
    # The DB ceiling: the template's recorded answer. The fair ceiling: the answer it got.
    recorded = [db_ceiling.recorded(fixtures, f"db-{i:07d}") for i in range(6)]
    answered = [
        db_ceiling.Written(
            f"fair-{i:07d}", fixtures[i % 4], _wire(templates[i % 4]), fixtures[i % 4].result,
            fixtures[i % 4].execution, 20.0,
        )
        for i in range(6)
    ]
    for batch in (recorded, answered):
        runs, metrics, outbox = db_ceiling.columns(batch)
        assert [len(c) for c in runs] == [6] * 11
        assert [len(c) for c in metrics] == [6] * 9
        assert [len(c) for c in outbox] == [12] * 4
        assert runs[0] == metrics[0]  # each metrics row belongs to its run
        assert runs[1] == [w.request_id for w in batch]
        for i, w in enumerate(batch):
            outcome = orjson.loads(outbox[3][2 * i])
            embedding = orjson.loads(outbox[3][2 * i + 1])
            assert outbox[2][2 * i] == w.fixture.outcome_key
            assert outbox[2][2 * i + 1] == "embedding.requested"
            assert outcome["request_id"] == embedding["request_id"] == w.request_id
            assert outcome["run_id"] == embedding["run_id"] == str(runs[0][i])
            assert outcome["event_id"] == str(outbox[0][2 * i])
            assert outcome["result"] == w.result and outcome["execution"] == w.execution
            assert uuid.UUID(embedding["event_id"]) == outbox[0][2 * i + 1]


def _curve(name: str, maximum: float, p99s: list[float]) -> Curve:
    curve = Curve(name, name.title(), maximum, "test", 15.0)
    for share, p99 in zip((0.1, 0.25, 0.5, 0.75, 0.9), p99s, strict=True):
        rate = share * maximum
        samples = [p99 / 3] * 50 + [p99] * 2
        curve.points.append(
            CurvePoint(share, f"{share * 100:g} %",
                       Latency.from_samples(rate, 52, samples, [1.0], rate), 2.0)
        )
    return curve


def test_curves_are_tabled_and_plotted(tmp_path: Path) -> None:
    curves = [_curve("eglo", 400, [40, 45, 60, 120, 400]),
              _curve("baseline", 180, [50, 52, 70, 90, 300])]
    curves[0].points.insert(
        0, CurvePoint(0.225, "baseline's half load",
                      Latency.from_samples(90, 10, [30.0] * 10, [1.0], 90), 2.0)
    )
    lines = format_curves(curves)
    assert len([line for line in lines if line.startswith("| Eglo")]) == 6
    assert any("baseline's half load (22 %)" in line for line in lines)
    path = tmp_path / "curves.png"
    plot(curves, path, "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_repeated_curve_point_reports_its_median_run_and_every_runs_p99() -> None:
    runs = [Latency.from_samples(200, 3, [10.0, 20.0, p99], [1.0], 200) for p99 in (180, 90, 120)]
    median = _median_run(runs)
    assert median is runs[2]  # p99 120: the middle of 90, 120, 180
    assert _median_run(runs[:2]) is runs[1]  # even count: the lower middle
    missing = Latency.from_samples(200, 3, [], [], 200)
    assert _median_run([missing, runs[1], runs[0]]) is runs[0]  # NaN (nothing received) last
    curve = Curve("eglo", "eglo", 400, "test", 15.0, repeat=3)
    curve.points.append(CurvePoint(0.5, "50 %", median, 2.0, p99_runs=[180, 90, 120]))
    lines = format_curves([curve])
    assert "/ 120 (runs: 180, 90, 120) |" in lines[2]
    assert "run 3 times: each point is the run with the median p99" in lines[-1]


def test_api_load_arrivals_even_and_poisson() -> None:
    even = api_load.arrivals(50, 20)
    assert len(even) == 1_000
    assert even[0] == 0.0 and even[1] == pytest.approx(0.02) and even[-1] == pytest.approx(19.98)
    assert api_load.arrivals(0, 20) == [] and api_load.arrivals(50, 0) == []
    poisson = api_load.arrivals(50, 200, poisson=True, seed=1)
    assert poisson == sorted(poisson) and poisson[0] > 0 and poisson[-1] < 200
    assert 9_500 < len(poisson) < 10_500  # 10,000 expected
    assert poisson == api_load.arrivals(50, 200, poisson=True, seed=1)  # seeded


def test_api_load_summary_counts_statuses_and_times_one() -> None:
    samples: list[tuple[int | str, float]] = [(200, float(ms)) for ms in range(1, 101)]
    samples += [(202, 5_000.0)] * 7 + [(503, 3.0), ("ClientOSError", 1.0)]
    load = api_load.summarise("wait", samples, 4.0, 200, offered_rate=25.0)
    assert load.statuses == {"200": 100, "202": 7, "503": 1, "error: ClientOSError": 1}
    assert (load.sent, load.count, load.answered) == (109, 100, 108)
    assert (load.p50_ms, load.p95_ms, load.p99_ms, load.max_ms) == (50.0, 95.0, 99.0, 100.0)
    assert load.per_s == 25.0 and load.offered_rate == 25.0
    none = api_load.summarise("submit", [(503, 1.0)], 1.0, 202, clients=4)
    assert none.count == 0 and none.p99_ms != none.p99_ms  # NaN, not a crash


def test_api_load_bodies_go_to_their_types_route_and_the_table_shows_both_loads() -> None:
    requests = [parse_request(d) for d in generate_requests(8, seed=4, id_prefix="t")]
    work = api_load.bodies(requests)
    assert {path for path, _ in work} == {"/forecast", "/storage-optimize",
                                          "/grid-switch-optimize", "/simulate"}
    for (path, body), request in zip(work, requests, strict=True):
        assert api_load.ROUTES[request.request_type] == path
        assert b"null" not in body and orjson.loads(body)["request_id"] == request.request_id
    submit = api_load.summarise("submit", [(202, 4.0)] * 99 + [(202, 40.0)], 0.5, 202, clients=32)
    wait = api_load.summarise("wait", [(200, 80.0)] * 95 + [(202, 5_003.0)] * 5, 2.0, 200,
                              offered_rate=50.0)
    result = api_load.ApiBench(submit, wait, 5.0, {"/forecast": 100}, 3.2, 80.0, 200, [0, 0])
    table = "\n".join(api_load.format_api(result))
    assert "**200 req/s** answered 202" in table and "4.0 / 4.0 / 4.0 / 40" in table
    assert "**5 still running (202)**" in table and "`?wait=5` at 50 req/s" in table


class _Message:
    """What EgloCore reads of a delivery."""

    def __init__(self, body: bytes, routing_key: str) -> None:
        self.body, self.routing_key, self.content_type = body, routing_key, "application/json"


def test_fair_ceiling_with_checks_does_eglos_core_work() -> None:
    """--checks: the request parsed as eglo's intake parses it, eglo's predict body, and the
    answer checked by eglo's result checks (a wrong answer is refused, as the worker refuses it)."""
    from qnn_emulator.predictors import predict
    from worker.core.result_checks import InvalidResult, check_result

    core = fair_ceiling.EgloCore()
    execution = {"model_id": "m", "device": "sim", "n_qubits": 4, "circuit_depth": 9,
                 "execution_time_ms": 12.5, "cost_usd": 0.01}
    for doc in generate_requests(8, seed=4, id_prefix="t"):
        wire = orjson.dumps(_without_nulls(doc))
        request = core.parse(_Message(wire, f"request.{doc['request_type']}"))  # type: ignore[arg-type]
        assert request == parse_request(doc)
        assert core.predict_body(request) == build_predict_body(
            request, model_id="PRETRAINED_QNN_GRID_MODEL", mode="quantum", optimization_level=1
        )
        answer = predict(request.payload).result
        data = {"prediction": answer, "execution": execution}
        body = orjson.dumps({"success": True, "data": data})
        result, metadata = core.check(request, body, 21.0)
        assert (result, metadata) == (
            check_result(request, answer, execution)[0],
            ExecutionMetadata.model_validate(execution).model_dump(mode="json"),
        )
        if request.request_type == "forecast":
            wrong = orjson.dumps({"success": True, "data": {"prediction": {"forecast": [-1.0]},
                                                             "execution": execution}})
            with pytest.raises(InvalidResult):
                core.check(request, wrong, 21.0)


def _drain(runs_per_s: float, cpu: float) -> Any:
    from benchmarks.harness import Drain

    return Drain(
        requests=1000, runs_per_s=runs_per_s, commits_per_s=runs_per_s, window_runs=900,
        window_s=900 / runs_per_s, total_s=1000 / runs_per_s, stored_all_s=None,
        cpu_per_1000={"consumer-1": cpu}, peak_rss_mb={}, completed=1000, max_relay_backlog=None,
    )


def test_results_table_prices_eglo_against_both_fair_ceilings() -> None:
    from benchmarks import e2e, run

    results = run.Results(started_at="now", command="test", mode="quick", sizes=run.QUICK,
                          worker_env={})
    results.fair = (_drain(600.0, 0.8), None)
    results.fair_checks = (_drain(500.0, 1.2), None)
    results.eglo = e2e.E2E("eglo", 1, _drain(450.0, 1.44), None, 1.0)
    table = run.format_results(results)
    rows = {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| 7")}
    assert set(rows) == {"| 7", "| 7b"}
    assert "| 600 (commits 600) | 0.80 (consumer) |" in rows["| 7"]
    assert "| 500 (commits 500) | 1.20 (consumer) |" in rows["| 7b"]
    assert "1.44 / 0.80 s per 1,000 runs = 1.80x | **not met**" in table
    assert "450 / 500 runs/s = 90 %; worker CPU 1.44 / 1.20 s per 1,000 runs = 1.20x" in table
    results.fair_checks = None
    results.errors["fair-checks"] = "boom"
    table = run.format_results(results)
    assert "| 7b | fair-checks | error: boom |" in table and "like for like" not in table
