"""(d) A graceful stop (SIGTERM): no new work is accepted (Slack HTTP gets 503 + Retry-After),
running answers get BOT_SHUTDOWN_GRACE_S to finish, and whatever is left is resumed, in the same
message, by the next process; nothing is marked failed."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.faults.conftest import MakeRig, transports
from tests.faults.harness import (
    TRANSPORTS,
    Question,
    SlackHttpTransport,
    check,
    failure,
    new_qid,
    settled,
    wait_settled,
    wait_streamed,
    wait_until,
)

pytestmark = [pytest.mark.faults, pytest.mark.slow]

EXIT_MARGIN_S = 3.0  # process teardown after the grace: closing sockets, the database


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sigterm_with_a_short_grace_leaves_the_answer_to_the_next_process(
    make_rig: MakeRig, transport: str
) -> None:
    grace = 1.0
    rig = await make_rig(transport, BOT_SHUTDOWN_GRACE_S=f"{grace:g}", FAULT_WORDS="120")  # ~6 s
    conversation = rig.transport.new_conversation()
    question = await rig.transport.ask(conversation)
    await wait_streamed(rig, question)

    signalled = rig.bot.terminate()
    await rig.bot.wait_exit(30)
    took = time.monotonic() - signalled
    problems = []
    if took > grace + EXIT_MARGIN_S:
        problems.append(f"the bot took {took:.1f} s to exit after SIGTERM (grace {grace:g} s)")
    statuses = await rig.db.event_statuses()
    if statuses.get(str(question.event_id)) == "failed":
        problems.append(f"{question.qid} was marked failed by the shutdown")

    await rig.bot.start()
    await wait_settled(rig.transport, rig.db, rig.bot)
    report = await check(rig.transport, rig.db)
    report.problems[:0] = problems
    assert report.ok, failure(report, rig.bot, "SIGTERM with a 1 s grace during a 6 s answer")


@pytest.mark.parametrize("transport", transports("slack_http", "discord_mention"))
async def test_sigterm_lets_a_running_answer_finish_within_the_grace(
    make_rig: MakeRig, transport: str
) -> None:
    rig = await make_rig(transport, BOT_SHUTDOWN_GRACE_S="30", FAULT_WORDS="80")  # ~4 s
    conversation = rig.transport.new_conversation()
    question = await rig.transport.ask(conversation)
    await wait_streamed(rig, question)

    signalled = rig.bot.terminate()
    await rig.bot.wait_exit(40)
    took = time.monotonic() - signalled

    # No restart: the answer must be complete when the process has exited.
    report = await check(rig.transport, rig.db)
    if took > 4.0 + EXIT_MARGIN_S + 1.0:
        report.problems.append(f"the bot took {took:.1f} s to exit, the answer needed at most 4 s")
    assert report.ok, failure(report, rig.bot, "SIGTERM with a 30 s grace during a 4 s answer")


async def test_slack_http_answers_503_with_retry_after_while_stopping(make_rig: MakeRig) -> None:
    rig = await make_rig("slack_http", BOT_SHUTDOWN_GRACE_S="30", FAULT_WORDS="100")
    transport = rig.transport
    assert isinstance(transport, SlackHttpTransport)
    conversation = transport.new_conversation()
    running = await transport.ask(conversation)
    await wait_streamed(rig, running)

    rig.bot.terminate()
    await asyncio.sleep(0.5)  # the signal is handled at once; the answer still runs for seconds
    other = transport.new_conversation()  # asked during the shutdown, in another thread
    qid = new_qid()
    question = Question(other, qid, qid, "U2", sent_at=time.monotonic())
    other.questions.append(question)
    body = transport.event(question)
    status, headers, _ = await transport.post(body)

    problems = []
    if status != 503:
        problems.append(f"an event during the shutdown was answered {status}, not 503")
    if "Retry-After" not in headers:
        problems.append(f"the shutdown's {status} has no Retry-After header: {headers}")
    await rig.bot.wait_exit(40)

    await rig.bot.start()
    if status != 200:
        await transport.deliver(question, body, first_retry=1)  # Slack retries it
    await wait_until(lambda: settled(transport, rig.db), 20, interval_s=0.1, abort=rig.bot.died)
    await asyncio.sleep(1.0)
    report = await check(transport, rig.db)
    report.problems[:0] = problems
    assert report.ok, failure(report, rig.bot, "Slack HTTP during a graceful stop")
