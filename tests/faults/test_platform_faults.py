"""Platforms that misbehave while the bot runs (no restarts):

(e) lookups answered out of order (Slack users.info slowest for the first sender; Discord: the first
/ask's deferral slowest): five quick questions in one conversation are still stored and answered
in arrival order; (f) edits slower than BOT_STREAM_INTERVAL: the number of edits stays bounded, one
at a time, each starting an interval after the previous one ended; (g) transient 5xx / 429 on the
final edit: retried, delivered once, without a "part of it may be missing" note.
"""

from __future__ import annotations

import pytest

from tests.adapters.discord import fake_discord
from tests.adapters.slack import fake_slack
from tests.faults.conftest import MakeRig, transports
from tests.faults.harness import check, failure, wait_settled

pytestmark = [pytest.mark.faults, pytest.mark.slow]


@pytest.mark.parametrize("transport", transports("slack_http", "slack_socket", "discord_ask"))
async def test_quick_questions_are_answered_in_arrival_order_despite_slow_lookups(
    make_rig: MakeRig, transport: str
) -> None:
    rig = await make_rig(transport, FAULT_WORDS="4")
    conversation = rig.transport.new_conversation()
    if rig.slack is not None:
        users = [f"U{n}" for n in range(1, 6)]
        rig.slack.add_fault(fake_slack.Fault("users.info", lambda p: p.get("user") == "U1", delay_s=1.5))
    else:
        assert rig.discord is not None
        users = [str(1001 + n) for n in range(5)]
        first: list[str] = []

        def first_callback(call: fake_discord.Call) -> bool:
            if not call.path.endswith("/callback"):
                return False
            first[:] = first or [call.path]
            return call.path == first[0]

        rig.discord.add_fault(fake_discord.Fault(first_callback, delay_s=1.5))
    for user in users:
        await rig.transport.ask(conversation, user=user)

    await wait_settled(rig.transport, rig.db, rig.bot, timeout_s=20)
    report = await check(rig.transport, rig.db)
    assert report.ok, failure(report, rig.bot, "five quick questions, the first one's lookup slowest")


@pytest.mark.parametrize("transport", transports("slack_http", "discord_mention"))
async def test_edits_slower_than_the_stream_interval_are_bounded_and_never_overlap(
    make_rig: MakeRig, transport: str
) -> None:
    interval = 0.5
    rig = await make_rig(transport, BOT_STREAM_INTERVAL=f"{interval:g}", FAULT_WORDS="80")  # ~4 s
    conversation = rig.transport.new_conversation()
    rig.transport.edit_fault(conversation, final_only=False, delay_s=3 * interval)
    question = await rig.transport.ask(conversation)

    await wait_settled(rig.transport, rig.db, rig.bot, timeout_s=20)
    report = await check(rig.transport, rig.db)
    edits = rig.transport.edits(question)
    began = rig.transport.first_write_at(question)
    ends = [end for _, end, _ in edits if end is not None]
    if began is not None and ends:
        duration = max(ends) - began
        bound = duration / interval + 2
        if len(edits) > bound:
            report.problems.append(
                f"{len(edits)} edits in {duration:.1f} s with a {interval:g} s interval (at most {bound:.0f})"
            )
        gaps = [start - end for (start, _, _), (_, end, _) in zip(edits[1:], edits, strict=False) if end]
        early = [round(gap, 2) for gap in gaps if gap < interval - 0.05]
        if early:
            report.problems.append(
                f"edits started sooner than {interval:g} s after the previous one ended: gaps {early}"
            )
    in_flight = rig.transport.max_edits_in_flight(question)
    if in_flight > 1:
        report.problems.append(f"{in_flight} edits of one message were in flight at once")
    assert report.ok, failure(report, rig.bot, f"edits taking {3 * interval:g} s")


@pytest.mark.parametrize(
    ("transport", "error"),
    [("slack_http", "500"), ("slack_socket", "429"), ("discord_mention", "500"), ("discord_ask", "429")],
)
async def test_a_final_edit_failing_twice_is_retried_and_delivered_once(
    make_rig: MakeRig, transport: str, error: str
) -> None:
    rig = await make_rig(transport, FAULT_WORDS="20")
    conversation = rig.transport.new_conversation()
    fault = rig.transport.edit_fault(conversation, final_only=True, errors=[error, error])
    await rig.transport.ask(conversation)

    await wait_settled(rig.transport, rig.db, rig.bot, timeout_s=30)
    report = await check(rig.transport, rig.db)
    if fault.seen < 2:
        report.problems.append(
            f"the final edit was tried {fault.seen} time(s): the faults were not exercised"
        )
    assert report.ok, failure(report, rig.bot, f"the final edit answered {error} twice")
