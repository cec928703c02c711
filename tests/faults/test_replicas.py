"""Several bot replicas on one PostgreSQL behind a load balancer (Slack over HTTP): every message is
answered exactly once and in order, even when one replica is killed (-9) mid-run: its claims
expire after BOT_LEASE_S and the others take them over, editing the messages it had started."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from tests.adapters.slack.fake_slack import FakeSlack
from tests.faults.conftest import BACKENDS, DEFAULT_ENV
from tests.faults.harness import (
    BotProcess,
    Conversation,
    Database,
    SlackHttpTransport,
    base_env,
    check,
    failure,
    wait_settled,
)
from tests.support import free_port

pytestmark = [pytest.mark.faults, pytest.mark.slow]

REPLICAS = 3
CONVERSATIONS = 20
PER_CONVERSATION = 10


@pytest.mark.parametrize("backend", [BACKENDS[1]], indirect=True)
async def test_replicas_answer_each_message_once_in_order_when_one_is_killed(
    tmp_path: Path, database_url: str
) -> None:
    slack = await FakeSlack().start()
    rng = random.Random(20261203)
    bots: list[BotProcess] = []

    def load_balancer() -> str:
        live = [bot for bot in bots if bot.running] or bots
        return rng.choice(live).url

    transport = SlackHttpTransport(slack, load_balancer)
    for n in range(REPLICAS):
        workdir = tmp_path / f"replica{n}"
        workdir.mkdir()
        port = free_port()
        env = {
            **base_env(workdir),
            **DEFAULT_ENV,
            "BOT_DATABASE_URL": database_url,
            "BOT_HTTP_PORT": str(port),
            "BOT_REPLICA_ID": f"replica-{n}",
            "BOT_LEASE_S": "2",
            "FAULT_TOKEN_DELAY_S": "0.01",
            "FAULT_WORDS": "4",
            **transport.env(),
        }
        bots.append(BotProcess(env, workdir, port))
    database = Database(database_url, tmp_path / "replica0" / "data")
    try:
        await asyncio.gather(*(bot.start() for bot in bots))
        conversations = [transport.new_conversation() for _ in range(CONVERSATIONS)]
        sent = 0
        killed = asyncio.Event()

        async def talk(conversation: Conversation) -> None:
            nonlocal sent
            for _ in range(PER_CONVERSATION):
                await transport.ask(conversation)  # returns once a replica acknowledged it
                sent += 1
                if sent >= CONVERSATIONS * PER_CONVERSATION // 3 and not killed.is_set():
                    killed.set()
                    await bots[0].kill()  # mid-run: it holds recorded and half-written answers
                await asyncio.sleep(rng.uniform(0, 0.05))

        await asyncio.wait_for(asyncio.gather(*(talk(c) for c in conversations)), 120)
        assert killed.is_set()
        await wait_settled(transport, database, bots[1], timeout_s=90, quiet_s=2.0)
        report = await check(transport, database)
        logs = "".join(bot.log_tail(3000) for bot in bots)
        assert report.questions == CONVERSATIONS * PER_CONVERSATION
        assert report.ok, failure(report, None, "3 replicas, one killed") + logs
        assert report.answered_once == report.questions
        # Each live replica answered some: the work was shared, not done by one.
        statuses = await database.event_statuses()
        assert set(statuses.values()) == {"delivered"}, statuses
    finally:
        for bot in bots:
            bot.close()
        await database.close()
        await slack.close()
