"""Tests for producers.reader: NDJSON / JSON-array input and one-line error messages."""

from __future__ import annotations

import io
import json
from typing import Any

import pydantic
import pytest

from contracts.requests import (
    ForecastRequest,
    GridSwitchRequest,
    OptimizationRequest,
    SimulationRequest,
    StorageRequest,
)
from producers.reader import ReadItem, format_validation_error, read_requests
from producers.sample import generate_requests

ADAPTER: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(OptimizationRequest)


def _read(text: str) -> list[ReadItem]:
    return list(read_requests(io.StringIO(text)))


def _dump(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


@pytest.fixture
def samples() -> list[dict[str, Any]]:
    """Eight valid sample requests covering all four types."""
    return generate_requests(8, 11)


def _forecast(samples: list[dict[str, Any]]) -> dict[str, Any]:
    return next(r for r in samples if r["request_type"] == "forecast")


def _with_first_load(samples: list[dict[str, Any]], literal: str) -> str:
    """A forecast NDJSON line whose first historical load is the raw JSON `literal`."""
    key = '"historical_loads":['
    return _dump(_forecast(samples)).replace(key, key + literal + ",", 1)


def test_ndjson_all_good(samples: list[dict[str, Any]]) -> None:
    """Valid NDJSON yields validated requests with 1-based line numbers, in order."""
    items = _read("".join(_dump(r) + "\n" for r in samples))
    assert [i.line for i in items] == list(range(1, 9))
    assert all(i.ok and i.error is None for i in items)
    assert [i.request.request_id for i in items if i.request] == [r["request_id"] for r in samples]
    kinds = {type(i.request) for i in items}
    assert kinds == {ForecastRequest, StorageRequest, GridSwitchRequest, SimulationRequest}


def test_ndjson_good_bad_and_blank_lines(samples: list[dict[str, Any]]) -> None:
    """Blank lines are skipped, bad lines become errors and reading carries on."""
    bad = _forecast(samples) | {"request_id": "bad-one"}
    bad["payload"] = dict(bad["payload"])
    bad["payload"]["historical_loads"] = [*bad["payload"]["historical_loads"]]
    bad["payload"]["historical_loads"][3] = -5.0
    text = "\n".join(
        [
            _dump(samples[0]),  # 1
            "",  # 2
            "   ",  # 3
            _dump(bad),  # 4
            "{not json",  # 5
            _dump(samples[1]),  # 6
            "",  # 7
        ]
    )
    items = _read(text)
    assert [(i.line, i.ok) for i in items] == [(1, True), (4, False), (5, False), (6, True)]
    assert items[1].error == (
        "line 4: payload.historical_loads.3: Input should be greater than or equal to 0"
    )
    assert items[2].error is not None
    assert items[2].error.startswith("line 5: invalid JSON:")
    assert items[3].request is not None
    assert items[3].request.request_id == samples[1]["request_id"]


def test_crlf_and_leading_blank_lines(samples: list[dict[str, Any]]) -> None:
    """Windows line endings and leading blank lines keep correct line numbers."""
    text = "\r\n\r\n" + _dump(samples[0]) + "\r\n" + "{oops\r\n" + _dump(samples[1]) + "\r\n"
    items = _read(text)
    assert [(i.line, i.ok) for i in items] == [(3, True), (4, False), (5, True)]


def test_json_array(samples: list[dict[str, Any]]) -> None:
    """A JSON array yields one item per element, numbered by position (index + 1)."""
    broken = _forecast(samples) | {"region": ""}
    text = "\n  " + json.dumps([samples[0], broken, 42, samples[1]], indent=2) + "\n"
    items = _read(text)
    assert [(i.line, i.ok) for i in items] == [(1, True), (2, False), (3, False), (4, True)]
    assert items[1].error is not None
    assert items[1].error.startswith("item 2: region: String should have at least 1 character")
    assert items[2].error == "item 3: expected a JSON object, got int"


def test_empty_inputs() -> None:
    """Empty input, whitespace only and an empty array yield nothing."""
    assert _read("") == []
    assert _read("\n  \n\t\n") == []
    assert _read("[]") == []


def test_malformed_array_is_one_error(samples: list[dict[str, Any]]) -> None:
    """A JSON array that does not parse gives a single error item for the whole input."""
    text = "[\n" + _dump(samples[0]) + ",\n" + _dump(samples[1]) + ',\n{"request_id": }\n]'
    items = _read(text)
    assert len(items) == 1
    assert items[0].line == 0
    assert items[0].request is None
    assert items[0].error is not None
    assert items[0].error.startswith("invalid JSON array:")
    assert "line 4" in items[0].error


def test_invalid_json_line_message() -> None:
    """Invalid JSON on a line is reported with its line number and stays on one line."""
    items = _read('\n\n{"request_id": "x",\n')
    assert len(items) == 1
    assert items[0].line == 3
    assert items[0].error is not None
    assert items[0].error.startswith("line 3: invalid JSON: ")
    assert "\n" not in items[0].error


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_rejected(samples: list[dict[str, Any]], literal: str) -> None:
    """JSON NaN/Infinity literals give a clear error for that line only."""
    good = _dump(samples[0])
    nan_line = _with_first_load(samples, literal)
    items = _read("\n".join([good, nan_line, good]))
    assert [(i.line, i.ok) for i in items] == [(1, True), (2, False), (3, True)]
    assert items[1].error is not None
    assert items[1].error.startswith("line 2: invalid JSON: ")
    assert literal in items[1].error
    assert "finite" in items[1].error


def test_nan_in_array_rejected(samples: list[dict[str, Any]]) -> None:
    """A NaN inside a JSON array makes the array invalid JSON: one error item."""
    items = _read("[" + _dump(samples[0]) + ', {"x": NaN}]')
    assert len(items) == 1
    assert items[0].error is not None
    assert "NaN" in items[0].error


def test_overflowing_number_is_not_finite(samples: list[dict[str, Any]]) -> None:
    """A number too large for a float is rejected by the contracts with the field path."""
    (item,) = _read(_with_first_load(samples, "1e999"))
    assert item.error is not None
    assert item.error.startswith("line 1: payload.historical_loads.0: ")
    assert "finite" in item.error


def test_wrong_schema_version(samples: list[dict[str, Any]]) -> None:
    """A schema_version other than 1 is reported on the schema_version field."""
    (item,) = _read(_dump(samples[0] | {"schema_version": 2}))
    assert item.error == "line 1: schema_version: Input should be 1"


def test_unknown_request_type(samples: list[dict[str, Any]]) -> None:
    """An unknown request_type names the field and the bad tag."""
    (item,) = _read("\n" + _dump(samples[0] | {"request_type": "teleport"}))
    assert item.error is not None
    assert item.error.startswith("line 2: request_type: ")
    assert "'teleport'" in item.error


def test_missing_request_type(samples: list[dict[str, Any]]) -> None:
    """A missing request_type is reported on the request_type field."""
    body = {k: v for k, v in samples[0].items() if k != "request_type"}
    (item,) = _read(_dump(body))
    assert item.error is not None
    assert item.error.startswith("line 1: request_type: ")


def test_non_object_lines() -> None:
    """A JSON value that is not an object is rejected with its type."""
    items = _read('"hello"\n42\nnull\n')
    assert [i.error for i in items] == [
        "line 1: expected a JSON object, got str",
        "line 2: expected a JSON object, got int",
        "line 3: expected a JSON object, got null",
    ]


def test_model_level_error_message(samples: list[dict[str, Any]]) -> None:
    """Cross-field errors name their model path and drop pydantic's 'Value error,' prefix."""
    storage = next(r for r in samples if r["request_type"] == "storage")
    payload = dict(storage["payload"]) | {"soc_max_kwh": storage["payload"]["capacity_kwh"] + 1}
    (item,) = _read(_dump(storage | {"payload": payload}))
    assert item.error == (
        "line 1: payload: need soc_min_kwh <= soc_max_kwh <= capacity_kwh (rule storage.soc_bounds)"
    )


def test_nested_simulation_path_omits_tags(samples: list[dict[str, Any]]) -> None:
    """Errors inside a simulation's base omit discriminator tags from the path."""
    sim = next(r for r in samples if r["request_type"] == "simulation")
    base = dict(sim["payload"]["base"]) | {"payload": {"bogus": 1}}
    body = sim | {"payload": dict(sim["payload"]) | {"base": base}}
    (item,) = _read(_dump(body))
    assert item.error is not None
    assert "line 1: payload.base.payload." in item.error
    for tag in ("forecast.", "storage.", "grid_switch.", "simulation."):
        assert tag not in item.error


def test_accepts_plain_iterable_of_lines(samples: list[dict[str, Any]]) -> None:
    """Any iterable of lines works, e.g. a list, not just a file object."""
    items = list(read_requests([_dump(samples[0]) + "\n", "\n", _dump(samples[1])]))
    assert [(i.line, i.ok) for i in items] == [(1, True), (3, True)]


def test_read_item_is_frozen(samples: list[dict[str, Any]]) -> None:
    """ReadItem is an immutable value."""
    (item,) = _read(_dump(samples[0]))
    with pytest.raises(AttributeError):
        item.line = 2  # type: ignore[misc]


def test_format_validation_error_short_and_capped() -> None:
    """The DLQ summary shows the first three errors, counts the rest and stays under 500 chars."""
    body = {
        "request_type": "forecast",
        "payload": {"historical_loads": [-1.0] * 30},
    }
    with pytest.raises(pydantic.ValidationError) as info:
        ADAPTER.validate_python(body)
    text = format_validation_error(info.value)
    assert text.startswith("request_id: Field required; region: Field required; ")
    assert text.count("; ") == 2
    assert text.endswith(f"(+{info.value.error_count() - 3} more errors)")
    assert "\n" not in text
    assert len(text) <= 500


def test_format_validation_error_truncates_long_messages() -> None:
    """Very long messages are cut to about 500 characters."""
    with pytest.raises(pydantic.ValidationError) as info:
        ADAPTER.validate_python({"request_type": "x" * 2000})
    text = format_validation_error(info.value)
    assert len(text) <= 500
    assert text.endswith("...")
    assert text.startswith("request_type: ")
