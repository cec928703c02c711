"""kill -9 at the worst moments; the restarted bot must finish every accepted answer in place.

(a) during generation, after the first streamed edit; (b) while the final edit is in flight (the
fake holds it); (c) with questions queued behind a running answer in the same conversation.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.faults.conftest import BACKENDS, MakeRig, Rig
from tests.faults.harness import Question, assert_delivered, check, wait_settled, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow]

ALL = ["slack_http", "slack_socket", "discord_mention", "discord_ask"]
# Every transport on SQLite; PostgreSQL for one transport of each platform.
MATRIX = [
    *[pytest.param(t, "sqlite", id=f"{t}-sqlite") for t in ALL],
    pytest.param("slack_http", BACKENDS[1], id="slack_http-postgres"),
    pytest.param("discord_mention", BACKENDS[1], id="discord_mention-postgres"),
]


async def wait_streamed(rig: Rig, question: Question, timeout_s: float = 15.0) -> None:
    streamed = await wait_until(lambda: rig.transport.streamed(question), timeout_s, abort=rig.bot.died)
    assert streamed, f"no partial answer was shown for {question.qid} within {timeout_s} s" + rig.bot.log_tail()


async def wait_recorded(rig: Rig, questions: list[Question], timeout_s: float = 5.0) -> bool:
    """Whether the bot recorded these events in the database (a fair moment to kill it)."""

    async def recorded() -> bool:
        statuses = await rig.db.event_statuses()
        return all(q.event_id in statuses for q in questions)

    return await wait_until(recorded, timeout_s, interval_s=0.1)


@pytest.mark.parametrize(("transport", "backend"), MATRIX, indirect=["backend"])
async def test_kill_during_generation(make_rig: MakeRig, transport: str, backend: str) -> None:
    rig = await make_rig(transport, FAULT_WORDS="40")
    conversation = rig.transport.new_conversation()
    question = await rig.transport.ask(conversation)
    await wait_streamed(rig, question)

    await rig.bot.kill()
    await rig.bot.start()

    await wait_settled(rig.transport, rig.db, rig.bot)
    assert_delivered(await check(rig.transport, rig.db), rig.bot, "killed during generation")


@pytest.mark.parametrize(
    ("transport", "backend"),
    [*MATRIX[:4], pytest.param("slack_socket", BACKENDS[1], id="slack_socket-postgres")],
    indirect=["backend"],
)
async def test_kill_while_the_final_edit_is_in_flight(make_rig: MakeRig, transport: str, backend: str) -> None:
    rig = await make_rig(transport, FAULT_WORDS="30")
    conversation = rig.transport.new_conversation()
    held = asyncio.Event()
    fault = rig.transport.edit_fault(conversation, final_only=True, hold=held)
    question = await rig.transport.ask(conversation)
    reached = await wait_until(lambda: fault.seen >= 1, 20, abort=rig.bot.died)
    assert reached, "the final edit never came" + rig.bot.log_tail()

    await rig.bot.kill()
    fault.active = False  # the platform works again for the restarted bot
    held.set()
    await rig.bot.start()

    await wait_settled(rig.transport, rig.db, rig.bot)
    assert_delivered(await check(rig.transport, rig.db), rig.bot, "killed in the final-edit window")


@pytest.mark.parametrize(
    ("transport", "backend"),
    [*MATRIX[:4], pytest.param("slack_socket", BACKENDS[1], id="slack_socket-postgres")],
    indirect=["backend"],
)
async def test_kill_with_questions_queued_behind_a_running_answer(
    make_rig: MakeRig, transport: str, backend: str
) -> None:
    rig = await make_rig(transport)
    conversation = rig.transport.new_conversation()
    first = await rig.transport.ask(conversation, "#words=60")
    await wait_streamed(rig, first)
    queued = [await rig.transport.ask(conversation, "#words=3") for _ in range(3)]
    await wait_recorded(rig, queued)  # not asserted: today's bot records them only when their turn comes

    await rig.bot.kill()
    await rig.bot.start()

    await wait_settled(rig.transport, rig.db, rig.bot, timeout_s=25)
    assert_delivered(await check(rig.transport, rig.db), rig.bot, "killed with B, C, D queued behind A")
