"""The harness's own check, which today's bot passes: with no fault, a question is answered once,
and after a clean restart the bot reconnects to the fakes and goes on with the same history."""

from __future__ import annotations

import pytest

from tests.faults.conftest import MakeRig, transports
from tests.faults.harness import check, failure, wait_settled

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.mark.parametrize("transport", transports("slack_socket"))
async def test_a_clean_restart_reconnects_and_keeps_the_history(make_rig: MakeRig, transport: str) -> None:
    rig = await make_rig(transport, FAULT_WORDS="5")
    conversation = rig.transport.new_conversation()
    await rig.transport.ask(conversation)
    await wait_settled(rig.transport, rig.db, rig.bot, quiet_s=0.2)

    rig.bot.terminate()  # idle: nothing to finish
    await rig.bot.wait_exit(30)
    await rig.bot.start()
    second = await rig.transport.ask(conversation)

    await wait_settled(rig.transport, rig.db, rig.bot)
    report = await check(rig.transport, rig.db)
    shown = rig.transport.messages(second)
    if not (shown and shown[0].startswith(f"Answer 2 to: {second.qid}")):
        report.problems.append(f"the second answer does not continue the history: {shown!r}")
    assert report.ok, failure(report, rig.bot, "a clean restart")
