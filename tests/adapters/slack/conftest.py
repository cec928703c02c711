from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.adapters.slack.fake_slack import FakeSlack


@pytest.fixture
async def fake() -> AsyncIterator[FakeSlack]:
    slack = await FakeSlack().start()
    try:
        yield slack
    finally:
        await slack.close()
