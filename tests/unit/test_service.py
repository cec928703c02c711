import asyncio
import threading

import pytest

from bot.generation import GenerationParams, GenerationRequest
from bot.service import (
    GenerationFailed,
    GenerationTimeout,
    ModelService,
    ServiceBusy,
    ServiceClosed,
)
from tests.support import ScriptedGenerator


async def collect(service: ModelService, request: GenerationRequest) -> tuple[list[str], str]:
    stream = service.stream(request)
    deltas = [delta async for delta in stream]
    assert stream.result is not None
    return deltas, stream.result.text


async def started(generator: ScriptedGenerator) -> ModelService:
    service = ModelService(lambda: generator, queue_size=2, timeout_s=5)
    await service.start()
    return service


async def test_streams_deltas_from_one_inference_thread() -> None:
    gen = ScriptedGenerator(lambda r: "one two three four")
    service = await started(gen)
    try:
        results = await asyncio.gather(
            *(collect(service, GenerationRequest(query=f"q{i}")) for i in range(2))
        )
    finally:
        await service.close()
    for deltas, text in results:
        assert "".join(deltas) == "one two three four"
        assert len(deltas) == 4
        assert text == "one two three four"
    assert gen.thread_names == {"inference"}
    assert threading.current_thread().name != "inference"


async def test_event_loop_stays_responsive_during_generation() -> None:
    gen = ScriptedGenerator(lambda r: "x " * 20, token_delay=0.02)
    service = await started(gen)
    try:
        task = asyncio.create_task(collect(service, GenerationRequest(query="q")))
        gaps = []
        loop = asyncio.get_running_loop()
        while not task.done():
            before = loop.time()
            await asyncio.sleep(0.005)
            gaps.append(loop.time() - before)
        await task
    finally:
        await service.close()
    assert max(gaps) < 0.1


async def test_full_queue_is_reported_at_once() -> None:
    gen = ScriptedGenerator(lambda r: "word " * 50, token_delay=0.02)
    service = await started(gen)
    try:
        first = asyncio.create_task(collect(service, GenerationRequest(query="a")))
        await asyncio.to_thread(gen.started.wait, 5)
        queued = [service.stream(GenerationRequest(query=f"b{i}")) for i in range(2)]
        assert service.queue_depth == 2
        with pytest.raises(ServiceBusy):
            service.stream(GenerationRequest(query="c"))
        for stream in queued:
            stream.cancel()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        await service.close()


async def test_cancellation_stops_generation_at_next_token() -> None:
    gen = ScriptedGenerator(lambda r: "w " * 1000 if r.query == "long" else "done", token_delay=0.01)
    service = await started(gen)
    try:
        stream = service.stream(GenerationRequest(query="long"))
        received = 0
        async for _ in stream:
            received += 1
            if received == 3:
                break
        # The generator sees should_stop() and frees the thread long before its 10 s answer ends.
        deltas, text = await asyncio.wait_for(collect(service, GenerationRequest(query="next")), 3)
    finally:
        await service.close()
    assert (deltas, text) == (["done"], "done")
    assert received == 3


async def test_token_limit_and_time_limit() -> None:
    gen = ScriptedGenerator(lambda r: "a b c d e f g h", token_delay=0.0)
    service = await started(gen)
    try:
        _, text = await collect(
            service, GenerationRequest(query="q", params=GenerationParams(max_new_tokens=3))
        )
        assert text == "a b c"
    finally:
        await service.close()

    slow = ScriptedGenerator(lambda r: "z " * 500, token_delay=0.01)
    service = ModelService(lambda: slow, queue_size=2, timeout_s=0.2)
    await service.start()
    try:
        with pytest.raises(GenerationTimeout):
            await asyncio.wait_for(collect(service, GenerationRequest(query="q")), 5)
    finally:
        await service.close()


async def test_generator_error_becomes_a_clear_failure() -> None:
    gen = ScriptedGenerator(fail_with=RuntimeError("boom"))
    service = await started(gen)
    try:
        with pytest.raises(GenerationFailed) as info:
            await collect(service, GenerationRequest(query="q"))
        assert "boom" not in str(info.value)
    finally:
        await service.close()


async def test_load_failure_is_raised_by_start() -> None:
    def broken() -> ScriptedGenerator:
        raise FileNotFoundError("no model here")

    service = ModelService(broken)
    with pytest.raises(FileNotFoundError, match="no model here"):
        await service.start()


async def test_close_cancels_queued_and_in_flight_work_and_joins() -> None:
    gen = ScriptedGenerator(lambda r: "w " * 1000, token_delay=0.01)
    service = ModelService(lambda: gen, queue_size=4, timeout_s=30)
    await service.start()
    running = asyncio.create_task(collect(service, GenerationRequest(query="a")))
    await asyncio.to_thread(gen.started.wait, 5)
    queued = asyncio.create_task(collect(service, GenerationRequest(query="b")))
    await asyncio.sleep(0)
    await asyncio.wait_for(service.close(), 5)
    results = await asyncio.gather(running, queued, return_exceptions=True)
    assert all(isinstance(result, Exception) for result in results)
    assert isinstance(results[1], ServiceClosed)
    with pytest.raises(ServiceClosed):
        service.stream(GenerationRequest(query="c"))
