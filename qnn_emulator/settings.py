"""Emulator configuration: fault knobs, API key, buffer sizes; env prefix EGLO_EMULATOR_."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL_ID = "PRETRAINED_QNN_GRID_MODEL"
Rate = Field(default=0.0, ge=0.0, le=1.0)


class FaultKnobs(BaseModel):
    """What can go wrong on predict; the rates are probabilities of disjoint outcomes per call."""

    latency_ms: float = Field(default=0.0, ge=0.0, le=600_000.0)
    error_rate: float = Rate
    throttle_rate: float = Rate
    hang_rate: float = Rate
    garbage_rate: float = Rate
    retry_after_s: int = Field(default=1, ge=0, le=3600)
    hang_s: float = Field(default=600.0, ge=0.0, le=86_400.0)
    # A quota like a real API's: predict calls beyond it are answered 429 with Retry-After.
    rate_limit_per_s: float = Field(default=0.0, ge=0.0, le=1_000_000.0)
    rate_limit_burst: float = Field(default=0.0, ge=0.0, le=1_000_000.0)

    @model_validator(mode="after")
    def _rates_fit(self) -> FaultKnobs:
        total = self.error_rate + self.throttle_rate + self.hang_rate + self.garbage_rate
        if total > 1.0 + 1e-9:
            raise ValueError(f"fault rates add up to {total:g}, more than 1")
        return self

    def knobs(self) -> FaultKnobs:
        """Just the fault fields (drops the server settings of a subclass)."""
        return FaultKnobs.model_validate(self.model_dump(include=set(FaultKnobs.model_fields)))


class EmulatorSettings(BaseSettings, FaultKnobs):
    """Everything the emulator is started with; every field reads EGLO_EMULATOR_<NAME>."""

    model_config = SettingsConfigDict(env_prefix="EGLO_EMULATOR_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8099, ge=0, le=65535)
    seed: int | None = Field(default=None, description="Seeds the fault draws for reproducibility.")
    api_key: SecretStr | None = Field(
        default=None, description="If set, required as Bearer token or X-API-Key (not on health)."
    )
    unhealthy: bool = Field(default=False, description="Start with the whole API reporting down.")
    model_ids: tuple[str, ...] = (DEFAULT_MODEL_ID,)
    slow_execution_ms: float = Field(
        default=1000.0, gt=0, description="Executions slower than this are reported as anomalies."
    )
    anomaly_buffer: int = Field(default=1000, ge=1, le=1_000_000)
    log_buffer: int = Field(default=1000, ge=1, le=1_000_000)

    @classmethod
    def isolated(cls, **values: Any) -> EmulatorSettings:
        """Settings from `values` and the defaults only, whatever EGLO_EMULATOR_* says (tests)."""
        # No environment variable name can contain NUL, so nothing matches this prefix.
        return cls(_env_prefix="\0", _env_file=None, **values)
