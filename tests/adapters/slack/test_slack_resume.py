"""A bot killed between posting a placeholder and storing its ts: the next run finds that message
by its metadata (the event id) and edits it, instead of posting a second one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from slack_sdk.web.async_client import AsyncWebClient

from adapters.slack_reply import PLACEHOLDER, SlackReply
from tests.adapters.slack.fake_slack import BOT_TOKEN, FakeSlack


@pytest.fixture
async def client(fake: FakeSlack) -> AsyncIterator[AsyncWebClient]:
    yield AsyncWebClient(token=BOT_TOKEN, base_url=fake.api_url)


@pytest.mark.parametrize("thread", ["1600000000.000100", None])  # a thread, or a DM's top level
async def test_a_placeholder_whose_ts_was_lost_is_found_and_edited(
    fake: FakeSlack, client: AsyncWebClient, thread: str | None
) -> None:
    other = SlackReply(client, "C1", thread, event_id="Ev-other", min_edit_interval=0)
    await other.begin()
    killed = SlackReply(client, "C1", thread, event_id="Ev1", min_edit_interval=0)
    await killed.begin()  # ... and the process dies before storing killed.handle
    resumed = SlackReply(
        client, "C1", thread, event_id="Ev1", find_after="1600000000.000100", min_edit_interval=0
    )
    await resumed.begin()
    assert resumed.handle == killed.handle
    await resumed.finish("the answer")
    assert sorted(fake.thread_text("C1", thread)) == sorted([PLACEHOLDER, "the answer"])
    assert len(fake.calls_to("chat.postMessage")) == 2  # the other answer's and the first run's


async def test_without_a_marked_message_a_placeholder_is_posted(
    fake: FakeSlack, client: AsyncWebClient
) -> None:
    resumed = SlackReply(client, "C1", "1600000000.000100", event_id="Ev1", find_after="1600000000.000100")
    await resumed.begin()
    assert fake.thread_text("C1", "1600000000.000100") == [PLACEHOLDER]
    (post,) = fake.calls_to("chat.postMessage")
    assert post.params["metadata"]["event_payload"] == {"event_id": "Ev1"}
