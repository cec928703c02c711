"""(h) A Discord /ask recovered after its interaction token expired (15 minutes): the answer
arrives as one channel message that quotes the question, instead of never."""

from __future__ import annotations

import pytest

from tests.faults.conftest import MakeRig
from tests.faults.harness import wait_streamed, wait_until

pytestmark = [pytest.mark.faults, pytest.mark.slow]


async def test_an_ask_recovered_after_its_token_expired_is_answered_in_the_channel(make_rig: MakeRig) -> None:
    # The interaction's id says it was created 20 minutes ago: its token is dead by recovery time.
    rig = await make_rig("discord_ask", ask_age_s=20 * 60, FAULT_WORDS="40")
    discord = rig.discord
    assert discord is not None
    conversation = rig.transport.new_conversation()
    question = await rig.transport.ask(conversation)
    await wait_streamed(rig, question)

    await rig.bot.kill()
    for interaction in discord.interactions.values():
        interaction.token_expired = True  # the webhook now answers 401 Invalid Webhook Token
    await rig.bot.start()

    channel = int(conversation.channel)

    def posted() -> list[str]:
        return [
            p.content
            for p in discord.bot_messages(channel)
            if p.kind == "channel" and question.qid in p.content
        ]

    ref = rig.transport.channel_ref(conversation)

    async def answered() -> bool:
        turns = [t for t in await rig.db.turns(ref) if question.qid in t.user]
        return bool(turns) and any(turns[0].assistant in text for text in posted())

    await wait_until(answered, 30, interval_s=0.1, abort=rig.bot.died)
    await wait_until(lambda: False, 1.0)  # anything posted late (a second copy) shows up too
    turns = [t for t in await rig.db.turns(ref) if question.qid in t.user]
    messages = posted()
    problems = []
    if len(turns) != 1:
        problems.append(f"{len(turns)} stored answers, expected one")
    if len(messages) != 1:
        problems.append(f"{len(messages)} channel messages for the question, expected one: {messages!r}")
    elif turns and turns[0].assistant not in messages[0]:
        problems.append(f"the channel message {messages[0]!r} lacks the stored answer {turns[0].assistant!r}")
    elif question.text not in messages[0].replace(turns[0].assistant if turns else "\0", ""):
        problems.append(f"the channel message {messages[0]!r} does not quote the question {question.text!r}")
    assert not problems, "; ".join(problems) + rig.bot.log_tail()
