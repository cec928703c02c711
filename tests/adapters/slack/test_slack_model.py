"""A mention answered by the real (tiny) ChatGLM2 model with greedy decoding, end to end."""

from __future__ import annotations

from pathlib import Path

from adapters.slack_reply import PLACEHOLDER, escape
from bot.model.engine import ChatGLM2Generator
from tests.adapters.slack.fake_slack import FakeSlack, event_body, mention
from tests.adapters.slack.harness import slack_rig
from tests.model.fixture import expected, tiny_dir


async def test_the_thread_shows_exactly_what_the_model_produced(tmp_path: Path, fake: FakeSlack) -> None:
    model = ChatGLM2Generator.load(tiny_dir("fp32"), dtype="float32", device="cpu")
    case = next(c for c in expected()["fp32"] if c["name"] == "en_single")
    greedy = {"temperature": 0.0, "max_new_tokens": 8, "max_context_tokens": 256}
    async with slack_rig(tmp_path, fake, model, **greedy) as rig:  # type: ignore[arg-type]
        event = mention("What is the capital of France?")
        status, _ = await rig.post(event_body(event))
        assert status == 200
        final = escape(case["chat_response_greedy_8"])
        await fake.wait_for(lambda: fake.thread_text("C1", event["ts"]) == [final], deadline_s=60)
        [reply] = fake.thread("C1", event["ts"])
        assert reply.edits[0] == PLACEHOLDER
        assert "&amp;" in final  # the model's "&" reached Slack escaped
