"""The request rules JSON Schema cannot state: cross-field checks, each with a stable id.

Published beside the schema (docs/schemas/request.rules.v1.json and `x-eglo-rules` in the AsyncAPI
document); a request that breaks one is dead-lettered as `invalid_request` with the rule's id in
`x-eglo-dead-letter-rule`. Ids are a contract: never reuse or rename one.
"""

from __future__ import annotations

from typing import Final

from pydantic_core import PydanticCustomError

RULE_ERROR: Final = "eglo_rule"

RULES: Final[dict[str, str]] = {
    "dataset_ref.span": "A dataset_ref spans 1 to 56 days: end_date is on or after start_date "
    "and at most 55 days later.",
    "forecast.temperature_aligned": "temperature_c, when given, has exactly one value per "
    "historical_loads value.",
    "storage.soc_bounds": "soc_min_kwh <= soc_max_kwh <= capacity_kwh.",
    "storage.soc_initial": "soc_min_kwh <= soc_initial_kwh <= soc_max_kwh.",
    "storage.load_forecast_aligned": "load_forecast, when given, has exactly one value per "
    "price_schedule step.",
    "grid_switch.unique_source_names": "No two sources share a name.",
    "simulation.unique_scenario_names": "No two scenarios share a name.",
}


def violation(rule_id: str, detail: str) -> PydanticCustomError:
    """The error a model validator raises for a broken rule; its id travels in the error's ctx."""
    assert rule_id in RULES, rule_id
    return PydanticCustomError(
        RULE_ERROR, "{detail} (rule {rule})", {"rule": rule_id, "detail": detail}
    )


def rules_document() -> dict[str, object]:
    """The machine-readable list, as published."""
    return {
        "$comment": "Cross-field rules of request.v1.json that JSON Schema cannot express.",
        "schema": "https://eglo.dev/schemas/request.v1.json",
        "rules": [{"id": rule_id, "rule": text} for rule_id, text in RULES.items()],
    }
