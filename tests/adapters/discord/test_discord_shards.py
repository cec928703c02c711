"""BOT_DISCORD_SHARDS: replicas split the gateway (discord.py's sharding) instead of each receiving all."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from bot.config import Settings
from tests.adapters.discord.conftest import StartRunning
from tests.adapters.discord.fake_discord import FakeDiscord


@pytest.mark.parametrize(
    ("value", "spec"), [("", None), ("0/1", ((0,), 1)), (" 1/2 ", ((1,), 2)), ("3,1/4", ((1, 3), 4))]
)
def test_shards_are_read_as_ids_out_of_a_count(value: str, spec: object) -> None:
    assert Settings(_env_file=None, discord_shards=value).shard_spec() == spec


@pytest.mark.parametrize("value", ["2", "2/2", "-1/2", "a/b", "/3", "0/0", "1,5/4"])
def test_bad_shard_specs_are_refused_with_the_setting_named(value: str) -> None:
    with pytest.raises(ValidationError, match="BOT_DISCORD_SHARDS must be IDS/COUNT"):
        Settings(_env_file=None, discord_shards=value)


async def test_a_sharded_replica_identifies_as_its_shard(fake: FakeDiscord, running: StartRunning) -> None:
    async with running(discord_shards="1/2"):
        assert fake.identifies[-1]["shard"] == [1, 2]
    async with running():
        assert "shard" not in fake.identifies[-1] or fake.identifies[-1]["shard"] == [0, 1]
