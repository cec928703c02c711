"""The fault benchmark: N questions over M conversations while the bot is killed (-9) and stopped
(SIGTERM) at random and the platforms fail writes at random (5xx, 429); then, what users saw.

The bot is the real ``serve`` (tests/faults/fault_bot.py: the product with a scripted model) as a
subprocess, with Slack (HTTP Events API or Socket Mode) and Discord configured at once; the fake
Slack and fake Discord run in this process. Conversations take turns: Slack threads, Discord
channels with mentions, Discord channels with ``/ask``. Each conversation's questions are sent in
order, with short random gaps, by their own sender, as the platform would deliver them: Slack HTTP
retries an event until it gets a 200, Socket Mode resends an envelope that got no ack, and a Discord
event sent less than a second before or after a kill or stop (the fake's gateway may not yet have
seen the socket close) and never recorded is sent again as a new message (Discord does not
redeliver it; the user would ask again).

It prints one JSON object:

- ``questions``: questions asked; ``answered_once + duplicates + lost == questions``
- ``answered_once``: exactly one bot message and one stored answer, the message showing the answer
- ``duplicates``: more than one bot message or stored answer for the question
- ``lost``: no stored answer, no message, or a message that does not show the stored answer
- ``dangling_placeholders``: placeholders (``thinking…``, ``…``, an unanswered deferral) left showing
- ``out_of_order``: questions whose answer was stored after that of a question asked later in the
  same conversation
- ``p99_ack_s``: the 99th percentile of the seconds from sending an event to its HTTP 200 (Slack
  HTTP), its ack (Socket Mode) or the bot's first reaction (Discord: its reply or deferral)
- ``restarts``: kills and stops done; ``elapsed_s``: the whole run

    python bench/faults.py [--messages 200] [--conversations 10] [--restarts 10] [--slack http]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.adapters.discord.fake_discord import FakeDiscord  # noqa: E402
from tests.adapters.slack.fake_slack import FakeSlack  # noqa: E402
from tests.faults.harness import (  # noqa: E402
    BotProcess,
    Conversation,
    Database,
    DiscordAskTransport,
    DiscordMentionTransport,
    DiscordTransport,
    Question,
    SlackHttpTransport,
    SlackSocketTransport,
    Transport,
    base_env,
    settled,
    wait_until,
)
from tests.support import free_port  # noqa: E402

KEYS = (
    "questions",
    "answered_once",
    "duplicates",
    "lost",
    "dangling_placeholders",
    "out_of_order",
    "p99_ack_s",
    "restarts",
    "elapsed_s",
)
LOSS_WINDOW_S = 1.0  # a Discord event this close to a kill or stop may never have reached the bot


def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(args.seed)
        self.slack = FakeSlack()
        self.discord = FakeDiscord()
        self.kills: list[float] = []  # when each kill or stop was sent
        self.restarts = 0
        self.sending = 0  # senders still running
        self.log = sys.stderr

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        await self.slack.start()
        await self.discord.start()
        port = free_port()
        slack: Transport = (
            SlackHttpTransport(self.slack, lambda: f"http://127.0.0.1:{port}")
            if self.args.slack == "http"
            else SlackSocketTransport(self.slack)
        )
        transports: list[Transport] = [
            slack,
            DiscordMentionTransport(self.discord),
            DiscordAskTransport(self.discord),
        ]
        database_url = self.args.database_url or f"sqlite:///{self.workdir / 'bench.db'}"
        env = {
            **base_env(self.workdir),
            "BOT_DATABASE_URL": database_url,
            "BOT_HTTP_PORT": str(port),
            "BOT_STREAM_INTERVAL": "0.2",
            "BOT_RECOVER_WINDOW_S": "900",
            "BOT_SHUTDOWN_GRACE_S": f"{self.args.grace:g}",
            "BOT_LEASE_S": "3",
            "BOT_REPLICA_ID": "fault-bench-1",
            "FAULT_TOKEN_DELAY_S": f"{self.args.token_delay:g}",
            "FAULT_WORDS": str(self.args.words),
        }
        for transport in transports:
            env |= transport.env()
        bot = BotProcess(env, self.workdir / "bot", port)
        database = Database(database_url, self.workdir / "bot" / "data")
        try:
            await bot.start()
            for transport in (slack, transports[1]):  # the Discord transports share one fake
                transport.chaos(self.args.fault_rate, self.args.seed)
            conversations = [
                transports[i % len(transports)].new_conversation() for i in range(self.args.conversations)
            ]
            owners = {id(c): transports[i % len(transports)] for i, c in enumerate(conversations)}
            counts = [
                self.args.messages // len(conversations)
                + (1 if i < self.args.messages % len(conversations) else 0)
                for i in range(len(conversations))
            ]
            self.sending = len(conversations)
            senders = [
                asyncio.create_task(self._send(owners[id(c)], c, n, bot, database))
                for c, n in zip(conversations, counts, strict=True)
            ]
            chaos = asyncio.create_task(self._restart(bot))
            await asyncio.wait_for(asyncio.gather(*senders, chaos), self.args.timeout)
            await wait_until(
                lambda: self._all_settled(transports, database), self.args.settle_timeout, interval_s=0.25
            )
            await asyncio.sleep(1.0)  # anything posted late (a duplicate) is counted too
            report = await self._tally(transports, conversations, owners, database)
        finally:
            bot.close()
            await database.close()
            await self.slack.close()
            await self.discord.close()
        report["restarts"] = self.restarts
        report["elapsed_s"] = round(time.monotonic() - started, 2)
        return {key: report[key] for key in KEYS}

    async def _all_settled(self, transports: list[Transport], database: Database) -> bool:
        for transport in transports:
            if not await settled(transport, database):
                return False
        return True

    async def _send(
        self,
        transport: Transport,
        conversation: Conversation,
        count: int,
        bot: BotProcess,
        database: Database,
    ) -> None:
        try:
            for _ in range(count):
                await asyncio.sleep(self.rng.uniform(0.05, 0.3))
                question = await transport.ask(conversation, f"#words={self.rng.randint(2, self.args.words)}")
                if isinstance(transport, DiscordTransport):
                    await self._confirm(transport, question, bot, database)
        finally:
            self.sending -= 1

    async def _confirm(
        self, transport: DiscordTransport, question: Question, bot: BotProcess, database: Database
    ) -> None:
        """Send a Discord question again (a new message, same words) while a kill right after it may
        have lost it before the bot recorded it."""
        for _ in range(3):
            sent = question.sent_at
            await asyncio.sleep(LOSS_WINDOW_S)
            if not any(abs(kill - sent) <= LOSS_WINDOW_S for kill in self.kills):
                return
            await wait_until(lambda: bot.running and transport.fake.connected, 60)
            await asyncio.sleep(1.0)  # recovery after the restart
            if (
                question.event_id in await database.event_statuses()
                or transport.reacted_at(question) is not None
            ):
                return
            print(f"faults: resending {question.qid}: lost with a kill", file=self.log)
            await transport._send(question)

    async def _restart(self, bot: BotProcess) -> None:
        for _ in range(self.args.restarts):
            await asyncio.sleep(self.rng.uniform(1.0, 3.0))
            self.kills.append(time.monotonic())
            if self.rng.random() < 0.5:
                await bot.kill()
                how = "kill -9"
            else:
                bot.terminate()
                await bot.wait_exit(self.args.grace + 30)
                how = "SIGTERM"
            self.restarts += 1
            seconds = await bot.start()
            print(f"faults: restart {self.restarts} ({how}), ready after {seconds:.1f} s", file=self.log)

    async def _tally(
        self,
        transports: list[Transport],
        conversations: list[Conversation],
        owners: dict[int, Transport],
        database: Database,
    ) -> dict[str, Any]:
        report: dict[str, Any] = {"questions": 0, "answered_once": 0, "duplicates": 0, "lost": 0}
        report |= {"dangling_placeholders": 0, "out_of_order": 0}
        acks: list[float] = []
        statuses = await database.event_statuses()
        breakdown: dict[str, dict[str, int]] = {}  # transport -> outcome -> questions, for stderr
        by_transport: dict[str, list[float]] = {}  # transport -> ack seconds, for stderr
        for conversation in conversations:
            transport = owners[id(conversation)]
            turns = await database.turns(transport.channel_ref(conversation))
            for question in conversation.questions:
                report["questions"] += 1
                stored = [turn for turn in turns if question.qid in turn.user]
                shown = transport.messages(question)
                if len(stored) > 1 or len(shown) > 1:
                    outcome = "duplicates"
                elif stored and shown and shown[0] == transport.shown(stored[0].assistant):
                    outcome = "answered_once"
                else:
                    outcome = "lost"
                    status = statuses.get(str(question.event_id), "never recorded")
                    shows = "nothing" if not shown else "a partial or other text" if stored else "text"
                    outcome_detail = f"lost ({status}; stored {len(stored)}, shows {shows})"
                    counts = breakdown.setdefault(transport.name, {})
                    counts[outcome_detail] = counts.get(outcome_detail, 0) + 1
                    since = [round(question.sent_at - kill, 2) for kill in self.kills]
                    nearest = min(since, key=abs) if since else None
                    print(
                        f"faults: {question.qid} ({transport.name}) {outcome_detail}; sent {nearest} s after "
                        "the nearest kill/stop",
                        file=self.log,
                    )
                report[outcome] += 1
                counts = breakdown.setdefault(transport.name, {})
                counts[outcome] = counts.get(outcome, 0) + 1
                reacted = transport.reacted_at(question)
                ack = question.ack_s
                if ack is None and reacted is not None:
                    ack = max(0.0, reacted - question.sent_at)
                if ack is not None:
                    acks.append(ack)
                    by_transport.setdefault(transport.name, []).append(ack)
            position: dict[str, int] = {}
            for index, turn in enumerate(turns):
                for question in conversation.questions:
                    if question.qid in turn.user:
                        position.setdefault(question.qid, index)
            asked = [q.qid for q in conversation.questions if q.qid in position]
            for index, qid in enumerate(asked):
                if any(position[later] < position[qid] for later in asked[index + 1 :]):
                    report["out_of_order"] += 1
            report["dangling_placeholders"] += sum(
                1 for text in transport.conversation_messages(conversation) if transport.is_placeholder(text)
            )
        report["p99_ack_s"] = round(percentile(acks, 0.99), 3)
        print(f"faults: by transport: {json.dumps(breakdown, sort_keys=True)}", file=self.log)
        p99 = {name: round(percentile(values, 0.99), 3) for name, values in sorted(by_transport.items())}
        print(f"faults: p99 ack seconds by transport: {json.dumps(p99)}", file=self.log)
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200, help="questions in all (default 200)")
    parser.add_argument("--conversations", type=int, default=10, help="conversations (default 10)")
    parser.add_argument(
        "--restarts", type=int, default=10, help="random kill -9 / SIGTERM restarts (default 10)"
    )
    parser.add_argument("--slack", choices=("http", "socket"), default="http", help="Slack's transport")
    parser.add_argument(
        "--fault-rate", type=float, default=0.05, help="share of platform writes failed (5xx/429)"
    )
    parser.add_argument("--token-delay", type=float, default=0.01, help="seconds per generated word")
    parser.add_argument("--words", type=int, default=8, help="at most this many filler words per answer")
    parser.add_argument("--grace", type=float, default=2.0, help="BOT_SHUTDOWN_GRACE_S for the bot")
    parser.add_argument("--database-url", help="default: a SQLite file in the work folder")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=900.0, help="bound on the sending and restarts")
    parser.add_argument("--settle-timeout", type=float, default=120.0, help="bound on the wait for answers")
    parser.add_argument("--workdir", type=Path, help="keep the bot's log and database here")
    parser.add_argument("--json", action="store_true", help="print the JSON report on one line")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.conversations < 1 or args.restarts < 0:
        parser.error("--messages and --conversations must be at least 1, --restarts at least 0")
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as scratch:
        workdir = args.workdir or Path(scratch)
        workdir.mkdir(parents=True, exist_ok=True)
        report = asyncio.run(Bench(args, workdir).run())
    print(json.dumps(report) if args.json else json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
