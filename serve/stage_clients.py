"""The production driver's ports in a cluster: async adapters around the generator and renderer handles.

``pipelines.produce`` drives a video through a ``LatentSource`` and a ``FrameRenderer``; the
compositor replica passes these two, one pair per video. They carry what only a cluster needs.

Renderer state. The causal decoder cache of a shot lives on the renderer replica that decoded its
previous chunk, so a shot whose chunks take more than one call routes them all with the same
``multiplexed_model_id`` (Serve routes such calls to the replica that already "holds" that id). A
shot sent whole in one call, the usual case since a generator hands a shot's chunks over together,
needs no affinity and carries no id: every new id changes the replica's id list, which Serve pushes
to its controller and broadcasts to every handle of the renderer. Routing affinity is best effort (a
busy or restarted replica can lose it), so the cache is treated as a cache: a replica without the
shot's state answers ``NeedHistory`` and the adapter resends the chunk with the shot's earlier
latents (a few MB even at 480p), from which the replica rebuilds the state. Frames are identical
either way; only the retry costs time.

Replica loss inside a request. A stage replica can die while a video is being made (OOM kill, node
loss, a crash). The adapters retry the lost call instead of failing the video: a lost chunk is
rendered again on another replica together with the shot's earlier latents (the ``NeedHistory``
path), and a lost generator stream is re-issued from the first shot not fully received (shots are
seeded one by one, so the re-run gives the same latents; chunks that already arrived are dropped).
Frames equal those of a run without the fault. Retries are bounded (``RetryPolicy``); when they are
spent the video fails with ``StageUnavailable``, whose message carries no Ray internals.

Tensors cross replicas as numpy arrays (Ray's zero-copy path), never as lists or base64.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
from ray.exceptions import NodeDiedError, ObjectLostError, RayActorError, RayTaskError, WorkerCrashedError
from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from shopreel.pipelines.produce import DenoiseStep, ProductionOrder
from shopreel.pipelines.types import FrameChunk, LatentChunk

logger = logging.getLogger("shopreel.serve")


# --- replica loss inside a request ---------------------------------------------------------------


class StageUnavailable(RuntimeError):
    """A stage's replicas kept dying during one video and the retries are spent.

    The message is meant for clients (no Ray internals); the Ray error it was raised from is chained
    and logged when it is raised.
    """

    def __init__(self, stage: str, attempts: int) -> None:
        plural = "" if attempts == 1 else "s"
        super().__init__(f"{stage} replicas kept failing ({attempts} attempt{plural}); try again later")
        self.stage = stage
        self.attempts = attempts

    def __reduce__(self) -> tuple[Any, ...]:
        # Crosses replicas pickled: rebuild from our own arguments, not from the formatted message.
        return (type(self), (self.stage, self.attempts))


@dataclass(frozen=True)
class RetryPolicy:
    """How hard a video retries a stage call whose replica died, before ``StageUnavailable``.

    Serve needs a few seconds to replace the only replica of a stage; a retried call waits in Serve's
    queue for the replacement, so the budget bounds the time between the first and the last failure.
    """

    attempts: int = 5  # consecutive failures of one call (one chunk, or the stream without progress)
    budget_s: float = 30.0  # ... or this long since the first of them
    backoff_s: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 4.0)  # wait before retry n (last one repeats)
    generator_restarts: int = 4  # stream re-issues per video, however much progress each made

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.generator_restarts < 0:
            raise ValueError("RetryPolicy needs attempts >= 1 and generator_restarts >= 0")
        if self.budget_s < 0 or any(delay < 0 for delay in self.backoff_s):
            raise ValueError("RetryPolicy budget_s and backoff_s must not be negative")


# A replica's process or node went away (or none was reachable): the call's input was fine.
_LOST_REPLICA_ERRORS: tuple[type[BaseException], ...] = (
    RayActorError,
    WorkerCrashedError,
    NodeDiedError,
    ObjectLostError,
    DeploymentUnavailableError,
)


def replica_lost(exc: BaseException) -> bool:
    """Whether a stage call failed because its replica died (or none was reachable), not its input."""
    if isinstance(exc, RayTaskError):
        # A call chained through another deployment reports the dead actor as the task's cause.
        return isinstance(exc.cause, RayActorError)
    return isinstance(exc, _LOST_REPLICA_ERRORS)


class _Failures:
    """Consecutive replica losses of one stage call: waits before the next attempt or gives up."""

    def __init__(self, stage: str, policy: RetryPolicy, request_id: str) -> None:
        self.stage = stage
        self.policy = policy
        self.request_id = request_id
        self.count = 0
        self.first_at = 0.0

    def reset(self) -> None:
        """The call made progress: later losses start a new streak."""
        self.count = 0

    async def wait_or_give_up(self, exc: BaseException, what: str) -> None:
        now = time.monotonic()
        if self.count == 0:
            self.first_at = now
        self.count += 1
        policy = self.policy
        delay = policy.backoff_s[min(self.count, len(policy.backoff_s)) - 1] if policy.backoff_s else 0.0
        if self.count >= policy.attempts or now + delay - self.first_at > policy.budget_s:
            logger.error(
                "request %s: %s replica lost (%s), giving up after %d attempts",
                self.request_id,
                self.stage,
                what,
                self.count,
                exc_info=exc,
            )
            raise StageUnavailable(self.stage, self.count) from exc
        logger.warning(
            "request %s: %s replica lost (%s), retry %d in %.2f s",
            self.request_id,
            self.stage,
            what,
            self.count,
            delay,
            exc_info=exc,
        )
        await asyncio.sleep(delay)


class ChunkLedger:
    """Which latent chunks of a stream of shots arrived, so a re-issued generator stream resumes cleanly.

    The generator emits shots ``first_shot`` to ``end_shot`` in order and a shot's chunks in order, so
    what arrived is a prefix: all chunks of shots before ``resume_shot`` and the first few chunks of
    that shot. A stream re-issued from ``resume_shot`` sends those few again; ``accept`` tells them
    apart from new ones.
    """

    def __init__(self, end_shot: int, first_shot: int = 0) -> None:
        if not 0 <= first_shot < end_shot:
            raise ValueError(f"need 0 <= first_shot < end_shot (num_shots), got {first_shot}, {end_shot}")
        self.end_shot = end_shot
        self.resume_shot = first_shot  # the first shot not fully received
        self._chunks_of_resume_shot = 0

    @property
    def complete(self) -> bool:
        return self.resume_shot == self.end_shot

    def accept(self, chunk: LatentChunk) -> bool:
        """True for a chunk not seen yet; False for one an earlier stream already delivered."""
        shot, index = chunk.shot_index, chunk.chunk_index
        if shot < self.resume_shot or (shot == self.resume_shot and index < self._chunks_of_resume_shot):
            return False
        if shot != self.resume_shot or index != self._chunks_of_resume_shot:
            # Anything else would leave a hole the causal renderer cannot decode across.
            raise RuntimeError(
                f"generator sent shot {shot} chunk {index}, expected shot {self.resume_shot} chunk "
                f"{self._chunks_of_resume_shot}"
            )
        if chunk.is_last:
            self.resume_shot += 1
            self._chunks_of_resume_shot = 0
        else:
            self._chunks_of_resume_shot += 1
        return True


@dataclass(frozen=True)
class NeedHistory:
    """A renderer replica has no (or another) causal state for this shot: resend with history."""

    next_latent: int


# --- the ports -----------------------------------------------------------------------------------


class RemoteLatentSource:
    """The generator deployment as one video's ``LatentSource``; a lost stream is re-issued.

    ``shot_parallel`` > 1 fans the shots out: one generator call per shot, that many at once, started
    in storyboard order (the first shot first, for the time to the first fragment), so several
    generator replicas denoise one video. Chunks still leave in storyboard order (a later shot that
    finishes first waits); denoising steps pass at once.
    """

    def __init__(self, generator: DeploymentHandle, policy: RetryPolicy, shot_parallel: int = 1) -> None:
        if shot_parallel < 1:
            raise ValueError(f"shot_parallel must be >= 1, got {shot_parallel}")
        self.generator = generator
        self.policy = policy
        self.shot_parallel = shot_parallel
        self.restarts = 0

    def stream(self, order: ProductionOrder) -> AsyncIterator[LatentChunk | DenoiseStep]:
        shots = len(order.storyboard.shots)
        if self.shot_parallel == 1 or shots == 1:
            return self._shots(order, 0, shots)
        return self._fanned_out(order)

    async def _fanned_out(self, order: ProductionOrder) -> AsyncIterator[LatentChunk | DenoiseStep]:
        shots = len(order.storyboard.shots)
        arrived: asyncio.Queue[tuple[int, LatentChunk | DenoiseStep | BaseException]] = asyncio.Queue()
        slots = asyncio.Semaphore(self.shot_parallel)

        async def one_shot(shot: int) -> None:
            try:
                async with slots:
                    async for item in self._shots(order, shot, shot + 1):
                        await arrived.put((shot, item))
            except Exception as exc:  # noqa: BLE001 - raised by the consuming loop below
                await arrived.put((shot, exc))

        # Tasks are created in shot order and take the slots in that order: shot 0 starts first.
        tasks = [asyncio.create_task(one_shot(shot)) for shot in range(shots)]
        held: dict[int, list[LatentChunk]] = {shot: [] for shot in range(shots)}
        next_shot = 0
        try:
            while next_shot < shots:
                shot, item = await arrived.get()
                if isinstance(item, BaseException):
                    raise item
                if isinstance(item, DenoiseStep):
                    yield item
                    continue
                held[shot].append(item)
                while next_shot < shots and held[next_shot]:
                    chunk = held[next_shot].pop(0)
                    yield chunk
                    if chunk.is_last:
                        next_shot += 1
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _shots(
        self, order: ProductionOrder, first_shot: int, end_shot: int
    ) -> AsyncIterator[LatentChunk | DenoiseStep]:
        """Shots ``first_shot`` to ``end_shot`` from one generator call, re-issued if its replica dies."""
        request_id = order.request_id
        ledger = ChunkLedger(end_shot, first_shot)
        failures = _Failures("generator", self.policy, request_id)
        # Latents of the chunks received of the shot in progress: what a re-issued stream sends again.
        partial_shot: list[np.ndarray] = []
        while not ledger.complete:
            stream: DeploymentResponseGenerator = self.generator.options(stream=True).generate.remote(  # type: ignore[assignment]
                order.storyboard,
                request_id,
                order.num_inference_steps,
                order.guidance_scale,
                start_shot=ledger.resume_shot,
                end_shot=end_shot,
                speed_profile=order.speed_profile,
                step_cache=order.step_cache,
            )
            try:
                async for item in stream:  # a step, or a shot's chunks (one message)
                    if isinstance(item, DenoiseStep):
                        yield item
                        continue
                    for chunk in item:
                        if not ledger.accept(chunk):
                            _check_resent(request_id, chunk, partial_shot)
                            continue
                        failures.reset()
                        if chunk.is_last:
                            partial_shot = []
                        else:
                            partial_shot.append(np.asarray(chunk.latents))
                        yield chunk
            except Exception as exc:
                if not replica_lost(exc):
                    raise
                if ledger.complete:
                    break  # lost after its last chunk: nothing is missing
                self.restarts += 1
                if self.restarts > self.policy.generator_restarts:
                    logger.error(
                        "request %s: generator replica lost %d times, giving up",
                        request_id,
                        self.restarts,
                        exc_info=exc,
                    )
                    raise StageUnavailable("generator", self.restarts) from exc
                await failures.wait_or_give_up(exc, f"stream from shot {ledger.resume_shot}")
                continue
            finally:
                stream.cancel()  # no-op once it ended; stops the replica's denoising when we stop early
            if not ledger.complete:
                raise RuntimeError(f"generator stream ended before shot {ledger.resume_shot} was complete")


def _check_resent(request_id: str, chunk: LatentChunk, partial_shot: list[np.ndarray]) -> None:
    """A chunk a re-issued stream sent again: rendered already, it must equal the first copy."""
    if chunk.chunk_index < len(partial_shot) and not np.array_equal(
        partial_shot[chunk.chunk_index], np.asarray(chunk.latents)
    ):
        # Seeded denoising is deterministic on one device type; keep the first copy (its frames are
        # out already), so this shot may show a seam at the chunk boundary.
        logger.warning(
            "request %s shot %d chunk %d: re-generated latents differ from the first run",
            request_id,
            chunk.shot_index,
            chunk.chunk_index,
        )


def _request_router(handle: DeploymentHandle) -> tuple[Any, Any] | None:
    """The request router behind a handle and the event loop it runs on (Serve internals: None if moved)."""
    router = getattr(handle, "_router", None)
    request_router = getattr(getattr(router, "_asyncio_router", None), "_request_router", None)
    loop = getattr(router, "_asyncio_loop", None)
    if request_router is None or loop is None:
        return None
    return request_router, loop


def forget_routing_key(handle: DeploymentHandle, key: str) -> bool:
    """Let Serve's router let go of a finished shot's routing key, and of the last call it keeps for it.

    Ray Serve's request router (2.60 here) indexes pending requests by multiplexed model id and prunes
    a key's finished requests only when the same key is routed again. Each shot has a key of its own,
    last used by the shot's last call, so every finished shot left that call (its latent chunks are
    the arguments) referenced for the life of the compositor replica: it grew by ~30 KB per video on
    the tiny preset in ``benchmarks/soak.py``, megabytes per video at 480p. This runs the router's own
    pruning for the key, on the router's loop, once the shot is done; a key with a call still pending
    keeps it. False where this Ray's router has no such index (``routing_keys_held`` then says so).
    """
    found = _request_router(handle)
    if found is None:
        return False
    request_router, loop = found
    prune = getattr(request_router, "_get_pending_request_matching_multiplexed_model_id", None)
    if prune is None:
        return False

    def forget() -> None:
        prune(SimpleNamespace(multiplexed_model_id=key))  # drops the key's done requests, then the key
        fallback = getattr(request_router, "_multiplexed_model_id_fallback_match", None)
        if isinstance(fallback, set):
            fallback.discard(key)

    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if loop is running:
        forget()
    else:  # Serve's default: the router runs on a loop of its own thread
        loop.call_soon_threadsafe(forget)
    return True


def routing_keys_held(handle: DeploymentHandle) -> int | None:
    """Routing keys Serve's router behind ``handle`` still indexes (None: unknown to this Ray)."""
    found = _request_router(handle)
    index = None if found is None else getattr(found[0], "_pending_requests_by_model_id", None)
    return None if index is None else len(index)


class RemoteFrameRenderer:
    """The renderer deployment as one video's ``FrameRenderer``; keeps each shot's latents for resends.

    Hops, not decoding, dominated a small video's time in the cluster (one round trip per chunk, each
    waiting for the last). So each shot has a lane: the chunks of the shot that are waiting go to the
    renderer in one streaming call, and the replica streams each chunk's frames back as soon as they
    exist. A generator hands a shot's chunks over together, so a shot usually costs one call.

    At most ``max_in_flight`` calls are at renderer replicas at once; a call waiting to retry does not
    hold a slot, so other shots' chunks go meanwhile.
    """

    def __init__(
        self, renderer: DeploymentHandle, policy: RetryPolicy, request_id: str, max_in_flight: int
    ) -> None:
        self.renderer = renderer
        self.policy = policy
        self.request_id = request_id
        self.in_flight = asyncio.Semaphore(max_in_flight)
        self.retries = 0
        # A shot's latents so far (one array per chunk): what a replica without the shot's causal cache
        # rebuilds it from. Dropped once the shot's last chunk is rendered.
        self.history: dict[int, list[np.ndarray]] = {}
        self.waiting: dict[int, list[tuple[LatentChunk, asyncio.Future[FrameChunk]]]] = {}
        self.lanes: dict[int, asyncio.Task[None]] = {}
        # Shots whose calls carry a routing key (they span calls, or their frames are cached) and the key.
        self.keyed: dict[int, str] = {}

    async def render(self, chunk: LatentChunk) -> FrameChunk:
        shot = chunk.shot_index
        self.history.setdefault(shot, []).append(np.asarray(chunk.latents))
        frames: asyncio.Future[FrameChunk] = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(shot, []).append((chunk, frames))
        if shot not in self.lanes:
            self.lanes[shot] = asyncio.create_task(self._lane(shot))
        return await frames

    def release(self, request_id: str) -> None:
        for lane in self.lanes.values():
            lane.cancel()
        for key in self.keyed.values():  # shots that did not finish: their keys were not forgotten yet
            forget_routing_key(self.renderer, key)
        self.keyed.clear()
        self.history.clear()  # replicas drop the shots' caches when they go idle

    async def _lane(self, shot: int) -> None:
        """Send the shot's waiting chunks, a run at a time, until none wait."""
        batch: list[tuple[LatentChunk, asyncio.Future[FrameChunk]]] = []
        try:
            while batch := self.waiting.pop(shot, []):
                await self._send(shot, batch)
        except BaseException as exc:
            for _, frames in batch + self.waiting.pop(shot, []):
                if frames.done():
                    continue
                if isinstance(exc, Exception):
                    frames.set_exception(exc)  # the driver awaits each chunk and raises it
                else:
                    frames.cancel()
            if not isinstance(exc, Exception):
                raise
        finally:
            self.lanes.pop(shot, None)

    def _routing_key(self, shot: int) -> str:
        return f"{self.request_id}:{shot}"

    def _handle_for(self, shot: int, ends_shot: bool, cache_key: str | None) -> DeploymentHandle:
        """The renderer handle for a call of ``shot``: plain for a shot decoded in one call; keyed by the
        shot once it spans calls; keyed by its content address when its frames are cached, so that the
        next video with that shot (a variant) goes to the replica that holds them."""
        if cache_key is not None:
            key = f"frames:{cache_key}"
        elif ends_shot and shot not in self.keyed:
            return self.renderer.options(stream=True)
        else:
            key = self._routing_key(shot)
        self.keyed[shot] = key
        return self.renderer.options(multiplexed_model_id=key, stream=True)

    async def _send(self, shot: int, batch: list[tuple[LatentChunk, asyncio.Future[FrameChunk]]]) -> None:
        handle = self._handle_for(shot, ends_shot=batch[-1][0].is_last, cache_key=batch[0][0].cache_key)
        failures = _Failures("renderer", self.policy, self.request_id)
        history_asked = False
        while pending := [(chunk, frames) for chunk, frames in batch if not frames.done()]:
            first = pending[0][0]
            try:
                async with self.in_flight:
                    # After a lost replica the shot's cache is gone for sure: send the history at once.
                    answered, need_history = await self._call(
                        handle, pending, with_history=history_asked or failures.count > 0
                    )
            except Exception as exc:
                if not replica_lost(exc):
                    raise
                await failures.wait_or_give_up(exc, f"shot {shot} chunk {first.chunk_index}")
                self.retries += 1
                continue
            if answered:
                failures.reset()
                history_asked = False
            if need_history:
                if history_asked:
                    raise RuntimeError(
                        f"renderer answered NeedHistory for shot {shot} chunk {first.chunk_index} "
                        "although its history was sent"
                    )
                logger.info(
                    "request %s shot %d: renderer lost its cache, resending %d latent frames",
                    self.request_id,
                    shot,
                    first.latent_start,
                )
                history_asked = True
            elif answered < len(pending):
                raise RuntimeError(
                    f"renderer stream for shot {shot} ended after {answered} of {len(pending)} chunks"
                )
        if batch[-1][0].is_last:
            self.history.pop(shot, None)  # only now: a retry of this shot still needs it
            if shot in self.keyed:  # the router's index lets go; replicas still report the key they hold
                forget_routing_key(self.renderer, self.keyed.pop(shot))

    def _earlier(self, chunk: LatentChunk) -> np.ndarray:
        return np.concatenate(self.history[chunk.shot_index], axis=2)[:, :, : chunk.latent_start]

    async def _call(
        self,
        handle: DeploymentHandle,
        pending: list[tuple[LatentChunk, asyncio.Future[FrameChunk]]],
        *,
        with_history: bool,
    ) -> tuple[int, bool]:
        """One streaming call for ``pending``; resolves each chunk as its frames arrive.

        Returns how many chunks it answered and whether the replica asked for the shot's history.
        """
        first = pending[0][0]
        history = self._earlier(first) if with_history and first.latent_start > 0 else None
        stream: DeploymentResponseGenerator = handle.render_chunks.remote(  # type: ignore[assignment]
            [chunk for chunk, _ in pending], history
        )
        answered = 0
        try:
            async for result in stream:
                if isinstance(result, NeedHistory):
                    return answered, True
                if not isinstance(result, FrameChunk):
                    raise RuntimeError(f"renderer answered {type(result).__name__} for a chunk")
                frames = pending[answered][1]
                if not frames.done():  # its caller may have been cancelled
                    frames.set_result(result)
                answered += 1
        finally:
            stream.cancel()  # no-op once it ended
        return answered, False
