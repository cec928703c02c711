import os

import pytest

# The platform SDKs read proxy variables themselves; tests only ever talk to 127.0.0.1.
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
    os.environ.pop(_name, None)
os.environ["NO_PROXY"] = "127.0.0.1,localhost"


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings come from the test, never from the developer's shell."""
    for name in list(os.environ):
        if name.startswith(("BOT_", "SLACK_", "DISCORD_")) and not name.startswith("BOT_TEST_"):
            monkeypatch.delenv(name, raising=False)
