import asyncio

import pytest

from bot.generation import BatchGenerator, GenerationParams, GenerationRequest
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
