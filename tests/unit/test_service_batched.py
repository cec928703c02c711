import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

from bot.generation import BatchGenerator, GenerationParams, GenerationRequest, GenerationResult, IdleWork
from bot.service import GenerationCancelled, GenerationFailed, ModelService, ServiceClosed
from tests.support import ScriptedBatchGenerator
from tests.unit.test_service import collect


async def started(gen: ScriptedBatchGenerator, queue_size: int = 16) -> ModelService:
    service = ModelService(lambda: gen, queue_size=queue_size, timeout_s=10)
    await service.start()
    return service


async def test_concurrent_requests_decode_together_with_identical_output() -> None:
    gen = ScriptedBatchGenerator(
        lambda r: f"answer for {r.query} " + "x " * int(r.query[1:]), token_delay=0.01
    )
    assert isinstance(gen, BatchGenerator)
    service = await started(gen)
    try:
        requests = [GenerationRequest(query=f"q{n}") for n in (3, 10, 6, 1, 8, 2)]
        results = await asyncio.gather(*(collect(service, r) for r in requests))
    finally:
        await service.close()
    for request, (deltas, text) in zip(requests, results, strict=True):
        expected = (f"answer for {request.query} " + "x " * int(request.query[1:])).strip()
        assert text == expected
        assert "".join(deltas).strip() == expected
    assert max(gen.step_sizes) == 4  # batched, capped at max_batch_size
    assert gen.thread_names == {"inference"}
    # Six requests of 4..13 pieces in batches of <= 4 need far fewer steps than decoding one by one.
    assert len(gen.step_sizes) < sum(4 + int(r.query[1:]) for r in requests)


async def test_requests_join_and_leave_at_step_boundaries() -> None:
    gen = ScriptedBatchGenerator(lambda r: "w " * (30 if r.query == "long" else 3), token_delay=0.01)
    service = await started(gen)
    try:
        long = asyncio.create_task(collect(service, GenerationRequest(query="long")))
        await asyncio.to_thread(gen.started.wait, 5)
        await asyncio.sleep(0.05)
        short = await collect(service, GenerationRequest(query="short"))
        assert not long.done(), "the short request finished while the long one kept decoding"
        await long
    finally:
        await service.close()
    assert short[1] == "w w w"
    assert 2 in gen.step_sizes and gen.step_sizes[-1] == 1


async def test_cancelling_one_request_leaves_the_others_running() -> None:
    gen = ScriptedBatchGenerator(lambda r: "w " * 40, token_delay=0.01)
    service = await started(gen)
    try:
        doomed = service.stream(GenerationRequest(query="a"))
        keeper = asyncio.create_task(collect(service, GenerationRequest(query="b")))
        received = 0
        async for _ in doomed:
            received += 1
            if received == 2:
                break
        deltas, text = await keeper
    finally:
        await service.close()
    assert text == ("w " * 40).strip() and "".join(deltas) == "w " * 40


async def test_per_request_token_limit_in_a_batch() -> None:
    gen = ScriptedBatchGenerator(lambda r: "a b c d e f", token_delay=0.005)
    service = await started(gen)
    try:
        limited = collect(service, GenerationRequest(query="x", params=GenerationParams(max_new_tokens=2)))
        full = collect(service, GenerationRequest(query="y"))
        (_, short_text), (_, long_text) = await asyncio.gather(limited, full)
    finally:
        await service.close()
    assert (short_text, long_text) == ("a b", "a b c d e f")


async def test_begin_failure_fails_only_that_request() -> None:
    gen = ScriptedBatchGenerator(fail_with=RuntimeError("bad prompt"))
    service = await started(gen)
    try:
        with pytest.raises(GenerationFailed):
            await collect(service, GenerationRequest(query="q"))
        gen.fail_with = None
        _, text = await collect(service, GenerationRequest(query="q"))
    finally:
        await service.close()
    assert text == "Answer 1 to: q"


async def test_close_ends_a_running_batch() -> None:
    gen = ScriptedBatchGenerator(lambda r: "w " * 1000, token_delay=0.01)
    service = await started(gen)
    tasks = [asyncio.create_task(collect(service, GenerationRequest(query=f"{i}"))) for i in range(3)]
    await asyncio.to_thread(gen.started.wait, 5)
    await asyncio.sleep(0.05)
    assert service.in_flight == 3
    await asyncio.wait_for(service.close(), 5)
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, GenerationCancelled | ServiceClosed) for r in results)


OnText = Callable[[str], None]
ShouldStop = Callable[[], bool]


class IdleScriptedGenerator(ScriptedBatchGenerator):
    """Records when the service runs its idle work: ``units`` units after each finished request."""

    def __init__(self, *args: Any, units: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.units = units
        self.left = 0
        self.log: list[str] = []

    def begin(self, request: GenerationRequest, on_text: OnText, should_stop: ShouldStop) -> Any:
        self.log.append(f"begin {request.query}")
        return super().begin(request, on_text, should_stop)

    def finish(self, state: Any) -> GenerationResult:
        self.left = self.units
        self.log.append("finish")
        return super().finish(state)

    def generate(
        self, request: GenerationRequest, on_text: OnText, should_stop: ShouldStop
    ) -> GenerationResult:
        self.log.append(f"begin {request.query}")  # the serial path: one call per request
        result = super().generate(request, on_text, should_stop)
        self.left = self.units
        self.log.append("finish")
        return result

    def idle_step(self) -> bool:
        if self.left == 0:
            raise AssertionError("idle_step called with no work left")
        self.left -= 1
        self.log.append("idle")
        time.sleep(0.02)
        return self.left > 0


@pytest.mark.parametrize("max_batch_size", [1, 4], ids=["serial", "batched"])
async def test_idle_work_runs_only_between_requests(max_batch_size: int) -> None:
    gen = IdleScriptedGenerator(lambda r: "a b c", token_delay=0.005, max_batch_size=max_batch_size)
    assert isinstance(gen, IdleWork)
    service = await started(gen)
    try:
        assert (await collect(service, GenerationRequest(query="one")))[1] == "a b c"
        for _ in range(100):  # the three idle units run after the answer is delivered
            if gen.log.count("idle") == 3:
                break
            await asyncio.sleep(0.01)
        assert gen.log[-3:] == ["idle"] * 3
        gen.units = 50  # 50 x 20 ms of idle work: a new request must not wait for all of it
        await collect(service, GenerationRequest(query="two"))
        for _ in range(500):  # until the idle work after "two" has begun (not a fixed sleep)
            if "idle" in gen.log[gen.log.index("begin two") :]:
                break
            await asyncio.sleep(0.01)
        assert (await collect(service, GenerationRequest(query="three")))[1] == "a b c"
        # "three" began before the idle work was done (the log, not the wall clock, says so).
        between = gen.log[gen.log.index("begin two") : gen.log.index("begin three")]
        assert 1 <= between.count("idle") < 50
    finally:
        await service.close()
    assert gen.thread_names == {"inference"}


async def test_failing_idle_work_is_logged_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    gen = IdleScriptedGenerator(lambda r: "a", units=0)  # idle_step raises: it has no work left
    service = await started(gen)
    try:
        await collect(service, GenerationRequest(query="one"))
        await asyncio.sleep(0.05)
        assert (await collect(service, GenerationRequest(query="two")))[1] == "a"
    finally:
        await service.close()
    assert "idle work failed" in caplog.text
