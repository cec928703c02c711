"""Translation of Slack payloads, one rule at a time (no network)."""

from __future__ import annotations

from typing import Any

import pytest

from adapters.slack_events import command_message, parse_command, slack_markup_to_text, to_message
from adapters.slack_reply import escape, slack_size
from bot.events import ChannelRef, Command
from tests.adapters.slack.fake_slack import BOT_USER_ID, event_body, mention, message


def translate(event: dict[str, Any], *, followups: bool = True, names: dict[str, str] | None = None) -> Any:
    return to_message(event_body(event, "Ev1"), BOT_USER_ID, names or {}, thread_followups=followups)


def test_top_level_mention_starts_a_thread_on_the_mention() -> None:
    event = mention("hello", channel="C7", ts="1.5")
    msg = translate(event, names={"U1": "Alice"})
    assert msg.event_id == "Ev1"
    assert msg.channel == ChannelRef("slack", "C7", "1.5")
    assert (msg.text, msg.author_id, msg.author_name) == ("hello", "U1", "Alice")
    assert msg.command is None and not msg.followup_only and not msg.is_direct
    # source_text keeps the Slack markup: resolve() redoes the text with looked-up names.
    assert dict(msg.raw) == {"channel": "C7", "thread_ts": "1.5", "ts": "1.5", "source_text": "<@UBOT> hello"}


def test_mention_inside_a_thread_joins_that_thread() -> None:
    msg = translate(mention("more", ts="2.0", thread_ts="1.0"))
    assert msg.channel == ChannelRef("slack", "C1", "1.0")


def test_commands_after_the_mention_are_left_to_the_core() -> None:
    msg = translate(mention("reset"))
    assert msg.text == "reset" and msg.command is None


def test_dm_top_level_is_one_conversation_and_a_dm_thread_its_own() -> None:
    top = translate(message("hi", channel="D1", channel_type="im"))
    assert top.channel == ChannelRef("slack", "D1", None) and top.is_direct
    threaded = translate(message("hi", channel="D1", channel_type="im", thread_ts="9.0"))
    assert threaded.channel == ChannelRef("slack", "D1", "9.0")


def test_a_mention_event_in_a_dm_is_left_to_the_message_event() -> None:
    assert translate(mention("hi", channel="D1")) is None


def test_thread_followup_without_mention_is_followup_only() -> None:
    msg = translate(message("and?", thread_ts="1.0"))
    assert msg.followup_only and msg.channel == ChannelRef("slack", "C1", "1.0")
    assert translate(message("and?", thread_ts="1.0"), followups=False) is None


@pytest.mark.parametrize(
    "event",
    [
        message("plain channel chatter"),
        message(f"<@{BOT_USER_ID}> also an app_mention", thread_ts="1.0"),
        message("own", channel="D1", channel_type="im", user=BOT_USER_ID),
        message("bot", channel="D1", channel_type="im", bot_id="B9"),
        message("edit", channel="D1", channel_type="im", subtype="message_changed"),
        message("gone", channel="D1", channel_type="im", subtype="message_deleted"),
        message("join", channel="D1", channel_type="im", subtype="channel_join"),
        {"type": "reaction_added", "user": "U1", "ts": "1.0", "channel": "C1", "text": ""},
        {"type": "message", "channel": "D1", "channel_type": "im", "text": "no user", "ts": "1.0"},
        {"type": "message", "channel": "D1", "user": "U1", "text": None, "ts": "1.0"},
    ],
)
def test_events_that_are_not_new_user_text_for_the_bot_are_dropped(event: dict[str, Any]) -> None:
    assert translate(event) is None


def test_file_shares_and_broadcasts_still_carry_user_text() -> None:
    assert translate(message("look", channel="D1", channel_type="im", subtype="file_share")) is not None


@pytest.mark.parametrize("body", [{}, {"event": "x", "event_id": "E"}, {"event": {}, "event_id": 5}])
def test_malformed_envelopes_are_dropped(body: dict[str, Any]) -> None:
    assert to_message(body, BOT_USER_ID, {}, thread_followups=True) is None


def test_clean_text_strips_the_bot_and_renders_markup_as_plain_text() -> None:
    text = (
        f"<@{BOT_USER_ID}>  hi <@U2> and <@U3|bob>, see <#C1|general> <!here> <!subteam^S1|@team> "
        "<https://a.example/x?y=1&amp;z=2|docs> <mailto:a@b.c> 1 &lt; 2 &amp;&amp; 3 &gt; 2"
    )
    assert slack_markup_to_text(text, BOT_USER_ID, {"U2": "Carol"}) == (
        "hi @Carol and @bob, see #general @here @team docs (https://a.example/x?y=1&z=2) "
        "mailto:a@b.c 1 < 2 && 3 > 2"
    )
    assert "<@" not in slack_markup_to_text("<@U9>", BOT_USER_ID, {})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("help", (Command.HELP, "")),
        ("", (Command.HELP, "")),
        ("  RESET now", (Command.RESET, "")),
        ("why is the sky blue?", (Command.CHAT, "why is the sky blue?")),
    ],
)
def test_slash_command_verbs(text: str, expected: tuple[Command, str]) -> None:
    assert parse_command(text) == expected


def test_slash_command_message_needs_its_ids() -> None:
    body = {"channel_id": "C1", "user_id": "U1", "trigger_id": "t1"}
    msg = command_message(body, Command.HELP, "help", None, {})
    assert msg is not None and msg.event_id == "command:t1" and msg.command is Command.HELP
    assert msg.raw["ephemeral"] is True
    assert command_message({**body, "trigger_id": ""}, Command.HELP, "help", None, {}) is None


def test_escape_neutralises_every_slack_control_sequence() -> None:
    assert escape("<!channel> & <@U1> <#C1> <http://x|y>") == (
        "&lt;!channel&gt; &amp; &lt;@U1&gt; &lt;#C1&gt; &lt;http://x|y&gt;"
    )
    assert escape("&lt;") == "&amp;lt;"  # literal entity text stays literal
    assert slack_size("<é>") == len("&lt;é&gt;".encode())
