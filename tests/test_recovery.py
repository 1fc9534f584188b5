"""Replica loss inside a request, without a cluster: the compositor against in-process stages.

The compositor talks to generator and renderer through Serve handles; here those handles are fakes
that call real in-process stage objects (tiny preset, torch renderer, CPU) and raise Ray's
``ActorDiedError`` where a replica would die. ``tests/test_faults.py`` kills real replicas.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import pickle
from collections.abc import AsyncIterator
from typing import Any

import av
import numpy as np
import pytest
import torch
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError
from storyboards import make_storyboard

from shopreel.pipelines.config import GenerateConfig, ModelConfig, PipelineConfig, RenderConfig
from shopreel.pipelines.generate import LatentGenerator
from shopreel.pipelines.produce import Produced, ProductionOrder
from shopreel.pipelines.types import LatentChunk
from shopreel.serve.config import ServeConfig
from shopreel.serve.deployments import CompositorDeployment, GeneratorDeployment, RendererDeployment
from shopreel.serve.stage_clients import (
    ChunkLedger,
    NeedHistory,
    RemoteFrameRenderer,
    RetryPolicy,
    StageUnavailable,
    replica_lost,
)

NO_WAIT = RetryPolicy(backoff_s=(0.0,))


def _chunk(shot: int, index: int, *, last: bool = False) -> LatentChunk:
    return LatentChunk("r", shot, index, 2 * index, 2 * index + 2, None, is_last=last, is_last_shot=False)


# --- the ledger: which chunks a re-issued generator stream must not render again -----------------


def test_ledger_resumes_at_the_first_incomplete_shot_and_drops_resent_chunks():
    ledger = ChunkLedger(3)
    assert [ledger.accept(c) for c in (_chunk(0, 0), _chunk(0, 1, last=True), _chunk(1, 0))] == [True] * 3
    assert (ledger.resume_shot, ledger.complete) == (1, False)
    # The generator died inside shot 1; the re-issued stream starts at shot 1 and sends chunk 0 again.
    assert ledger.accept(_chunk(1, 0)) is False
    assert ledger.accept(_chunk(1, 1)) is True
    assert ledger.accept(_chunk(1, 2, last=True)) is True
    assert ledger.resume_shot == 2
    assert ledger.accept(_chunk(0, 1, last=True)) is False  # a whole earlier shot, too
    assert ledger.accept(_chunk(2, 0, last=True)) is True
    assert ledger.complete


def test_ledger_refuses_a_hole():
    ledger = ChunkLedger(2)
    ledger.accept(_chunk(0, 0))
    with pytest.raises(RuntimeError, match="expected shot 0 chunk 1"):
        ledger.accept(_chunk(0, 2))
    with pytest.raises(RuntimeError, match="expected shot 0 chunk 1"):
        ledger.accept(_chunk(1, 0))
    with pytest.raises(ValueError, match="num_shots"):
        ChunkLedger(0)


def test_what_counts_as_a_lost_replica():
    assert replica_lost(ActorDiedError())
    assert replica_lost(DeploymentUnavailableError(None))  # type: ignore[arg-type]
    assert not replica_lost(ValueError("bad chunk"))
    wrapped = RayTaskError("render", "traceback", ActorDiedError())
    assert replica_lost(wrapped)
    assert not replica_lost(RayTaskError("render", "traceback", ValueError("x")))


def test_stage_unavailable_message_is_clean_and_survives_pickling():
    error = pickle.loads(pickle.dumps(StageUnavailable("renderer", 5)))
    assert isinstance(error, StageUnavailable) and (error.stage, error.attempts) == ("renderer", 5)
    assert str(error) == "renderer replicas kept failing (5 attempts); try again later"


def test_generate_from_a_start_shot_equals_the_tail_of_a_full_run(tiny_model):
    generator = LatentGenerator(tiny_model, GenerateConfig(chunk_latent_frames=2))
    storyboard = make_storyboard(shot_frames=(9, 13, 9))
    full = list(generator.generate(storyboard, request_id="r", num_inference_steps=2))
    tail = list(generator.generate(storyboard, request_id="r", num_inference_steps=2, start_shot=1))
    expected = [c for c in full if c.shot_index >= 1]
    assert [(c.shot_index, c.chunk_index, c.is_last, c.is_last_shot) for c in tail] == [
        (c.shot_index, c.chunk_index, c.is_last, c.is_last_shot) for c in expected
    ]
    for got, want in zip(tail, expected, strict=True):
        assert torch.equal(got.latents, want.latents)
    with pytest.raises(ValueError, match="start_shot"):
        next(generator.generate(storyboard, request_id="r", start_shot=3))


# --- the compositor with stages whose replicas die -------------------------------------------------


def _config(**fields: Any) -> ServeConfig:
    return ServeConfig(
        **fields,
        warmup=False,
        pipeline=PipelineConfig(
            model=ModelConfig(preset="tiny", device="cpu"), render=RenderConfig(backend="torch")
        ),
    )


class _Remote:
    def __init__(self, fn: Any) -> None:
        self.remote = fn


class _Stream:
    """What ``handle.options(stream=True).generate.remote(...)`` returns, dying after some chunks."""

    def __init__(self, source: AsyncIterator[Any], die_after_chunks: int | None) -> None:
        self.source = source
        self.die_after_chunks = die_after_chunks

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._items()

    async def _items(self) -> AsyncIterator[Any]:
        chunks = 0
        try:
            async for item in self.source:
                if isinstance(item, list):  # a shot's chunks: dying mid-list sends the chunks before it
                    left = None if self.die_after_chunks is None else self.die_after_chunks - chunks
                    if left is not None and left < len(item):
                        if left > 0:
                            yield item[:left]
                        raise ActorDiedError()
                    chunks += len(item)
                elif isinstance(item, LatentChunk):
                    if chunks == self.die_after_chunks:
                        raise ActorDiedError()
                    chunks += 1
                yield item
        finally:
            await self.source.aclose()  # type: ignore[attr-defined]

    def cancel(self) -> None:
        pass


class FakeGenerator:
    """Serve handle stand-in: call n of ``generate`` dies after ``die_after[n]`` chunks (None: never)."""

    def __init__(self, replica: Any, die_after: list[int | None]) -> None:
        self.replica = replica
        self.die_after = list(die_after)
        self.start_shots: list[int] = []
        self.ranges: list[tuple[int, int | None]] = []  # (start_shot, end_shot) of each call
        self.generate = _Remote(self._generate)

    def options(self, **_: Any) -> FakeGenerator:
        return self

    def _generate(
        self, *args: Any, start_shot: int = 0, end_shot: int | None = None, **options: Any
    ) -> _Stream:
        self.start_shots.append(start_shot)
        self.ranges.append((start_shot, end_shot))
        die = self.die_after.pop(0) if self.die_after else None
        stream = self.replica.generate(*args, start_shot=start_shot, end_shot=end_shot, **options)
        return _Stream(stream, die)


class FakeRenderer:
    """Serve handle stand-in: the replica dies on the first render of each chunk in ``die_on``.

    A death replaces the replica with a fresh one, which holds no causal caches (as after a restart).
    """

    def __init__(self, config: ServeConfig, die_on: set[tuple[int, int]], *, always: bool = False) -> None:
        self.config = config
        self.replica = RendererDeployment.func_or_class(config)
        self.die_on = set(die_on)
        self.always = always
        self.calls: list[tuple[int, int, int | None, str]] = []  # shot, chunk, history frames, outcome
        self.routing_keys: list[str | None] = []  # the multiplexed id of each call
        self.render_chunks = _Remote(self._render_chunks)

    def options(self, **options: Any) -> FakeRenderer:
        self.routing_keys.append(options.get("multiplexed_model_id"))
        return self

    def _render_chunks(self, chunks: list[LatentChunk], history: np.ndarray | None = None) -> _Stream:
        """The replica's streaming call: one answer per chunk, each through ``_render``."""

        async def answers() -> AsyncIterator[Any]:
            for index, chunk in enumerate(chunks):
                result = await self._render(chunk, history if index == 0 else None)
                yield result
                if isinstance(result, NeedHistory):
                    return

        return _Stream(answers(), None)

    async def _render(self, chunk: LatentChunk, history: np.ndarray | None = None) -> Any:
        key = (chunk.shot_index, chunk.chunk_index)
        sent = None if history is None else history.shape[2]
        if self.always or key in self.die_on:
            self.die_on.discard(key)
            self.replica = RendererDeployment.func_or_class(self.config)
            self.calls.append((*key, sent, "died"))
            raise ActorDiedError()
        result = await self.replica.render(chunk, history)
        self.calls.append((*key, sent, type(result).__name__))
        return result


@pytest.fixture(scope="module")
def generator_replica():
    return GeneratorDeployment.func_or_class(_config())


STORYBOARD = make_storyboard(shot_frames=(13, 13, 9), crossfade=2)  # chunks per shot: 2, 2, 2


def _produce(generator: Any, renderer: Any, retry: RetryPolicy = NO_WAIT, shot_parallel: int = 1) -> Produced:
    compositor = CompositorDeployment.func_or_class(
        _config(shot_parallel=shot_parallel), generator, renderer, retry
    )
    order = ProductionOrder(request_id="video_r", storyboard=STORYBOARD, audio="none", num_inference_steps=2)

    async def run() -> Produced:
        produced = None
        async for event in compositor.produce(order):
            if isinstance(event, Produced):
                produced = event
        assert produced is not None
        return produced

    return asyncio.run(run())


def _frames(mp4: bytes) -> np.ndarray:
    with av.open(io.BytesIO(mp4)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def reference(generator_replica):
    return _frames(_produce(FakeGenerator(generator_replica, []), FakeRenderer(_config(), set())).mp4)


def test_lost_replicas_mid_video_give_the_same_frames(generator_replica, reference):
    generator = FakeGenerator(generator_replica, [3, None])  # dies after shot 0 and shot 1's chunk 0
    renderer = FakeRenderer(_config(), {(1, 1), (2, 0)})
    produced = _produce(generator, renderer)

    np.testing.assert_array_equal(_frames(produced.mp4), reference)
    assert len(reference) == STORYBOARD.total_frames
    assert generator.start_shots == [0, 1]  # resumed at the shot it had not finished
    rendered = [(shot, chunk) for shot, chunk, _, outcome in renderer.calls if outcome == "FrameChunk"]
    # Every chunk decoded once: shot 1's chunk 0, sent again by the resumed stream, was not.
    assert sorted(rendered) == [(s, c) for s in range(3) for c in range(2)]
    # The lost chunk went to the replacement with the shot's earlier latents; the next shot started fresh.
    assert (1, 1, 2, "FrameChunk") in renderer.calls and (2, 0, None, "FrameChunk") in renderer.calls
    assert produced.timings.render_retries == 2 and produced.timings.generate_restarts == 1
    assert len(produced.shot_denoised_at) == 3


def test_spent_retries_fail_with_a_clean_stage_error(generator_replica):
    retry = RetryPolicy(attempts=3, backoff_s=(0.0,))
    renderer = FakeRenderer(_config(), set(), always=True)
    with pytest.raises(StageUnavailable, match="^renderer replicas kept failing") as caught:
        _produce(FakeGenerator(generator_replica, []), renderer, retry)
    assert isinstance(caught.value.__cause__, ActorDiedError) and caught.value.attempts == 3
    assert [outcome for shot, chunk, _, outcome in renderer.calls if (shot, chunk) == (0, 0)] == ["died"] * 3

    generator = FakeGenerator(generator_replica, [1, 0, 0, 0, 0, 0])
    with pytest.raises(StageUnavailable, match="^generator replicas kept failing"):
        _produce(generator, FakeRenderer(_config(), set()), retry)
    assert generator.start_shots == [0, 0, 0]  # no progress after the first chunk: 3 attempts in a row


def test_a_stage_error_that_is_not_a_lost_replica_is_not_retried(generator_replica):
    class BadRenderer(FakeRenderer):
        async def _render(self, chunk: LatentChunk, history: np.ndarray | None = None) -> Any:
            self.calls.append((chunk.shot_index, chunk.chunk_index, None, "refused"))
            raise ValueError("bad chunk")

    renderer = BadRenderer(_config(), set())
    with pytest.raises(ValueError, match="bad chunk"):
        _produce(FakeGenerator(generator_replica, []), renderer)
    assert len(renderer.calls) <= 2  # the chunks in flight when the first error arrived, none retried


def test_shot_parallel_gives_the_same_frames_one_call_per_shot_first_shot_first(generator_replica, reference):
    generator = FakeGenerator(generator_replica, [None, 0, None])  # shot 1's first call dies at once
    produced = _produce(generator, FakeRenderer(_config(), set()), shot_parallel=2)
    np.testing.assert_array_equal(_frames(produced.mp4), reference)
    # One call per shot, started in storyboard order; shot 1 re-issued alone after its replica died.
    assert generator.ranges[:2] == [(0, 1), (1, 2)]
    assert sorted(generator.ranges) == [(0, 1), (1, 2), (1, 2), (2, 3)]
    assert produced.timings.generate_restarts == 1


# --- the renderer port: one streaming call per run of a shot's waiting chunks ---------------------


def _shot_chunks(latents: np.ndarray) -> list[LatentChunk]:
    total = latents.shape[2]
    return [
        LatentChunk(
            "video_r", 0, index, start, start + 2, latents[:, :, start : start + 2], start + 2 >= total, True
        )
        for index, start in enumerate(range(0, total, 2))
    ]


@pytest.mark.parametrize("die_on", [set(), {(0, 1)}], ids=["healthy", "replica-lost-mid-call"])
def test_waiting_chunks_of_a_shot_go_in_one_streaming_call(die_on):
    renderer = FakeRenderer(_config(), die_on)
    batches: list[list[int]] = []
    streaming_call = renderer._render_chunks

    def recording(chunks: list[LatentChunk], history: np.ndarray | None = None) -> _Stream:
        batches.append([chunk.chunk_index for chunk in chunks])
        return streaming_call(chunks, history)

    renderer.render_chunks = _Remote(recording)
    z_dim = renderer.replica.renderer.backend.vae.config.z_dim
    latents = np.random.default_rng(3).standard_normal((1, z_dim, 6, 8, 8)).astype(np.float32)
    chunks = _shot_chunks(latents)
    reference_replica = RendererDeployment.func_or_class(_config())
    port = RemoteFrameRenderer(renderer, NO_WAIT, "video_r", max_in_flight=2)

    async def scenario() -> tuple[list[Any], list[Any]]:
        reference = [await reference_replica.render(chunk) for chunk in chunks]
        # The first two are handed over before either is back; the third after both are.
        got = list(await asyncio.gather(port.render(chunks[0]), port.render(chunks[1])))
        got.append(await port.render(chunks[2]))
        return reference, got

    reference, got = asyncio.run(scenario())
    for want, frames in zip(reference, got, strict=True):
        np.testing.assert_array_equal(frames.frames, want.frames)
    if not die_on:
        assert batches == [[0, 1], [2]] and port.retries == 0
    else:  # chunk 0 came back, chunk 1 died: it went again, alone, with the shot's first 2 latent frames
        assert batches == [[0, 1], [1], [2]] and port.retries == 1
        assert (0, 1, 2, "FrameChunk") in renderer.calls
    # The shot spans calls: each carries its key, so they reach the replica holding its decoder cache.
    assert renderer.routing_keys == ["video_r:0"] * 2
    assert port.history == {} and port.lanes == {} and port.keyed == {}  # the shot's end dropped them


def test_a_shot_sent_whole_carries_no_routing_key():
    """Every new key is pushed to Serve's controller and broadcast to every renderer handle: a shot
    decoded in one call needs no affinity, so it goes without one."""
    renderer = FakeRenderer(_config(), set())
    z_dim = renderer.replica.renderer.backend.vae.config.z_dim
    chunks = _shot_chunks(np.random.default_rng(4).standard_normal((1, z_dim, 6, 8, 8)).astype(np.float32))
    port = RemoteFrameRenderer(renderer, NO_WAIT, "video_r", max_in_flight=2)

    async def scenario() -> list[Any]:
        return list(await asyncio.gather(*(port.render(chunk) for chunk in chunks)))

    got = asyncio.run(scenario())
    assert [frames.chunk_index for frames in got] == [0, 1, 2]
    assert renderer.routing_keys == [None] and port.keyed == {}


def test_a_cached_shot_is_routed_by_its_content_address():
    """A shot whose frames the renderer keeps (a variant's shared shot) is keyed by its address, so the
    next variant's call reaches the replica that holds its frames; the router lets go of it after."""
    renderer = FakeRenderer(_config(), set())
    z_dim = renderer.replica.renderer.backend.vae.config.z_dim
    latents = np.random.default_rng(5).standard_normal((1, z_dim, 6, 8, 8)).astype(np.float32)
    chunks = [dataclasses.replace(chunk, cache_key="ab12") for chunk in _shot_chunks(latents)]
    port = RemoteFrameRenderer(renderer, NO_WAIT, "video_r", max_in_flight=2)

    async def scenario() -> list[Any]:
        return list(await asyncio.gather(*(port.render(chunk) for chunk in chunks)))

    assert [frames.chunk_index for frames in asyncio.run(scenario())] == [0, 1, 2]
    assert renderer.routing_keys == ["frames:ab12"] and port.keyed == {}
