"""The Discord adapter: discord.py's gateway client, translating only (no model, no SQL).

Every command and mention is handed to the core, which records it before anything else happens;
a slash command is then deferred (Discord's 3-second limit, by the reply's ``accept``) and answered
through the interaction token; mentions and DMs get a reply message that is edited as the answer
streams. The core answers in its own tasks, so the gateway (heartbeats, other events) never waits
for the model, and an answer in flight survives a gateway reconnect: its replies go over REST.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import aiohttp
import discord
import yarl
from discord.gateway import DiscordWebSocket
from discord.http import Route

from adapters.discord_commands import build_tree, invite_url, may_reset, may_reset_by_message
from adapters.discord_events import PLATFORM, addressed_to, from_interaction, from_message
from adapters.discord_reply import NO_MENTIONS, ORIGINAL, InteractionReply, MessageReply
from bot.config import ConfigError, Settings
from bot.core import RESET_REFUSAL
from bot.events import Command, Core, IncomingMessage, PlatformUnreachable, ReplyHandle

log = logging.getLogger(__name__)

# The bot never joins voice channels: skip discord.py's start-up warnings about voice libraries.
discord.VoiceClient.warn_nacl = False
discord.VoiceClient.warn_dave = False

# An interaction token lasts 15 minutes; keep a margin so a recovered answer can still finish.
INTERACTION_REPLY_WINDOW: Final = timedelta(minutes=12)


@contextmanager
def discord_endpoints(settings: Settings) -> Iterator[None]:
    """Point discord.py at the configured REST API and gateway (it reads both from class
    attributes, so they are process-wide), restoring the previous ones afterwards."""
    previous = Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY
    Route.BASE = settings.discord_api_url.rstrip("/")
    DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(settings.discord_gateway_url)
    try:
        yield
    finally:
        Route.BASE, DiscordWebSocket.DEFAULT_GATEWAY = previous


class DiscordAdapter:
    platform = PLATFORM

    def __init__(
        self,
        settings: Settings,
        *,
        ready_timeout: float = 60.0,
        guild_ready_timeout: float = 2.0,
    ) -> None:
        """``ready_timeout``: how long start() waits for the gateway; ``guild_ready_timeout``: how
        long discord.py waits for more servers' data before it reports ready."""
        if settings.discord_bot_token is None:
            raise ConfigError("DISCORD_BOT_TOKEN is not set")
        self._settings = settings
        self._token = settings.discord_bot_token.get_secret_value()
        self._ready_timeout = ready_timeout
        self._guild_ready_timeout = guild_ready_timeout
        self._stopping = False
        self._client: discord.Client | None = None
        self._gateway: asyncio.Task[None] | None = None
        self._core: Core | None = None
        self._endpoints = ExitStack()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self, core: Core) -> None:
        """Log in, connect the gateway in a background task and return once it is ready."""
        if self._client is not None:
            raise RuntimeError("the Discord adapter is already started")
        self._core = core
        self._endpoints.enter_context(discord_endpoints(self._settings))
        client = self._client = self._new_client()
        try:
            await self._login(client)
            self._gateway = asyncio.create_task(client.connect(reconnect=True), name="discord-gateway")
            await self._wait_ready(client, self._gateway)
        except BaseException:
            await self.stop()
            raise
        self._gateway.add_done_callback(_log_gateway_end)
        log.info("Discord: connected as %s (id %s)", client.user, client.user.id if client.user else "?")

    async def stop(self) -> None:
        """Take no new messages and disconnect (the core has finished or stopped its answers)."""
        self._stopping = True
        if self._client is not None:
            await self._client.close()
        if self._gateway is not None:
            self._gateway.cancel()
            await asyncio.gather(self._gateway, return_exceptions=True)
        self._client = self._gateway = None
        self._endpoints.close()
        self._stopping = False

    def connection(self) -> str:
        client = self._client
        if client is None or client.is_closed():
            return "down"
        if isinstance(client, discord.AutoShardedClient):
            up = all(not shard.is_closed() for shard in client.shards.values())
        else:
            up = client.ws is not None and client.ws.open
        # discord.py resumes a dropped gateway session by itself, with backoff.
        return "connected" if up else "reconnecting"

    async def lost(self) -> None:
        gateway = self._gateway
        if gateway is not None:
            await asyncio.wait({gateway})  # not gateway itself: cancelling lost() must not stop it
        if gateway is None or gateway.cancelled() or self._stopping:
            await asyncio.get_running_loop().create_future()  # stopped here, not lost
            return
        error = gateway.exception()
        raise _gateway_refusal(error) or PlatformUnreachable(
            f"the Discord gateway connection ended{f': {error}' if error else ''}"
        )

    def reply_for(self, message: IncomingMessage, handle: dict[str, Any] | None) -> ReplyHandle | None:
        """A reply for a message recovered from storage, or None if it can no longer be given. An
        interaction whose token has expired is answered by a channel message quoting it."""
        client, raw = self._client, message.raw
        if client is None or message.channel.platform != PLATFORM:
            return None
        ids = _message_ids(handle)
        try:
            if raw.get("kind") == "message":
                channel = client.get_partial_messageable(int(raw["channel_id"]))
                return MessageReply(channel, int(raw["message_id"]), message_ids=ids, nonce=message.event_id)
            if raw.get("kind") == "interaction":
                issued = discord.utils.snowflake_time(int(message.event_id))
                if datetime.now(UTC) - issued > INTERACTION_REPLY_WINDOW:
                    # The token has expired (or is about to): a new message in the channel.
                    channel = client.get_partial_messageable(int(raw["channel_id"]))
                    quote = f"> {message.author_name} asked: {message.text}"[:1000] + "\n"
                    # Once shown (a "message" handle), the same channel message is edited again.
                    shown = ids if handle is not None and handle.get("kind") == "message" else None
                    return MessageReply(channel, None, message_ids=shown, quote=quote, nonce=message.event_id)
                webhook = _interaction_webhook(client, int(raw["application_id"]), str(raw["token"]))
                return InteractionReply(
                    webhook,
                    ephemeral=bool(raw.get("ephemeral")),
                    where=_interaction_where(raw),
                    message_ids=ids or [ORIGINAL],
                )
        except (KeyError, TypeError, ValueError):
            log.warning("stored Discord event %s has an unreadable payload", message.event_id)
        return None

    async def resolve(self, message: IncomingMessage) -> IncomingMessage:
        return message  # Discord sends display names with every message and interaction

    # -- slash commands (called by the command tree) ------------------------------------------
    async def ask(self, interaction: discord.Interaction[discord.Client], prompt: str) -> None:
        await self._answer_command(interaction, Command.CHAT, prompt)

    async def reset(self, interaction: discord.Interaction[discord.Client]) -> None:
        if not may_reset(interaction, self._settings.discord_admin_ids):
            await interaction.response.send_message(
                RESET_REFUSAL, ephemeral=True, allowed_mentions=NO_MENTIONS
            )
            return
        await self._answer_command(interaction, Command.RESET, "")

    async def help(self, interaction: discord.Interaction[discord.Client]) -> None:
        await self._answer_command(interaction, Command.HELP, "")

    async def _answer_command(
        self, interaction: discord.Interaction[discord.Client], command: Command, text: str
    ) -> None:
        core = self._core
        if self._stopping or core is None:
            return  # Discord tells the user the application did not respond
        ephemeral = command is Command.HELP
        message = from_interaction(interaction, command, text)

        async def defer() -> None:
            await interaction.response.defer(thinking=True, ephemeral=ephemeral)

        reply = InteractionReply(
            interaction.followup,
            ephemeral=ephemeral,
            defer=defer,
            where=_interaction_where(message.raw),
            interaction_id=message.event_id,
        )
        await core.submit(message, reply)

    # -- mentions and DMs ------------------------------------------------------------------
    async def _on_message(self, message: discord.Message) -> None:
        client, core = self._client, self._core
        me = client.user if client is not None else None
        if self._stopping or client is None or core is None or me is None or not addressed_to(message, me):
            return
        allowed = may_reset_by_message(message, self._settings.discord_admin_ids)
        incoming = from_message(message, me, may_reset=allowed)
        reply = MessageReply(
            client.get_partial_messageable(message.channel.id), message.id, nonce=incoming.event_id
        )
        await core.submit(incoming, reply)

    async def _on_message_delete(self, payload: discord.RawMessageDeleteEvent) -> None:
        if self._core is not None:  # the question is gone: stop writing its answer
            self._core.cancel(PLATFORM, str(payload.message_id))

    # -- internals -------------------------------------------------------------------------
    def _new_client(self) -> discord.Client:
        intents = discord.Intents.none()
        intents.guilds = True
        intents.guild_messages = True
        intents.dm_messages = True
        intents.message_content = self._settings.discord_message_content
        options: dict[str, Any] = {
            "intents": intents,
            "allowed_mentions": NO_MENTIONS,
            "guild_ready_timeout": self._guild_ready_timeout,
        }
        shards = self._settings.shard_spec()
        client: discord.Client
        if shards is None:
            client = discord.Client(**options)
        elif len(shards[0]) == 1:  # one gateway session: this replica's share of the servers
            client = discord.Client(shard_id=shards[0][0], shard_count=shards[1], **options)
        else:
            client = discord.AutoShardedClient(shard_ids=list(shards[0]), shard_count=shards[1], **options)
        build_tree(client, self)

        async def on_message(message: discord.Message) -> None:
            await self._on_message(message)

        async def on_raw_message_delete(payload: discord.RawMessageDeleteEvent) -> None:
            await self._on_message_delete(payload)

        client.event(on_message)
        client.event(on_raw_message_delete)
        return client

    async def _login(self, client: discord.Client) -> None:
        try:
            await client.login(self._token)
        except discord.LoginFailure:
            raise ConfigError("Discord rejected DISCORD_BOT_TOKEN; copy the bot token again") from None
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            raise PlatformUnreachable(f"cannot log in to Discord at {Route.BASE}: {exc}") from None

    async def _wait_ready(self, client: discord.Client, gateway: asyncio.Task[None]) -> None:
        ready = asyncio.ensure_future(client.wait_until_ready())
        done, _ = await asyncio.wait(
            {ready, gateway}, timeout=self._ready_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if ready in done:
            return
        ready.cancel()
        error = gateway.exception() if gateway in done else None
        refusal = _gateway_refusal(error)
        if refusal is not None:
            raise refusal
        if isinstance(error, AttributeError) and error.__context__ is not None:
            # discord.py's reconnect loop reads the sequence of a websocket that never opened:
            # what failed is the connection it was handling.
            error = error.__context__
        reason = f": {error}" if error else f" within {self._ready_timeout:g} s"
        raise PlatformUnreachable(
            f"cannot connect to the Discord gateway {DiscordWebSocket.DEFAULT_GATEWAY}{reason}"
        )

    # -- command registration (chatglm-bot discord-sync) ----------------------------------------
    async def sync(self, guild_id: int | None) -> tuple[int, list[str]]:
        """Register the slash commands with Discord: (application id, command names)."""
        with discord_endpoints(self._settings):
            client = discord.Client(intents=discord.Intents.none())
            tree = build_tree(client, self)
            async with client:
                await self._login(client)
                guild = discord.Object(guild_id) if guild_id is not None else None
                if guild is not None:
                    tree.copy_global_to(guild=guild)
                synced = await tree.sync(guild=guild)
                assert client.application_id is not None  # set by login
                return client.application_id, sorted(command.name for command in synced)


def _interaction_webhook(client: discord.Client, application_id: int, token: str) -> discord.Webhook:
    """The follow-up webhook of an interaction, as ``Interaction.followup`` builds it."""
    data: Any = {"id": application_id, "type": 3, "token": token}
    return discord.Webhook.from_state(data, client._connection)


def _interaction_where(raw: Any) -> dict[str, Any]:
    """What a stored interaction reply needs besides its message ids (see ``reply_for``)."""
    keys = ("application_id", "token", "ephemeral", "channel_id")
    return {key: raw[key] for key in keys if key in raw}


def _message_ids(handle: dict[str, Any] | None) -> list[int]:
    ids = handle.get("ids") if handle is not None else None
    if not isinstance(ids, list):
        return []
    return [int(value) if str(value).isdigit() else ORIGINAL for value in ids]


# Gateway close codes that no reconnect can mend (Discord's "Gateway Close Event Codes").
_REFUSED: Final = {
    4004: "Discord rejected DISCORD_BOT_TOKEN; copy the bot token again",
    4010: "Discord refused the shard: check BOT_DISCORD_SHARDS",
    4011: "Discord requires sharding for this bot: set BOT_DISCORD_SHARDS",
    4013: "Discord refused the gateway intents",
}


def _gateway_refusal(error: BaseException | None) -> ConfigError | None:
    """The settings' fault, as one line, when the gateway ended because Discord refused them."""
    if isinstance(error, discord.PrivilegedIntentsRequired):
        return ConfigError(
            "Discord refused the message content intent: enable it for the bot in the developer "
            "portal, or set BOT_DISCORD_MESSAGE_CONTENT=false"
        )
    if isinstance(error, discord.ConnectionClosed) and error.code in _REFUSED:
        return ConfigError(f"{_REFUSED[error.code]} (gateway close code {error.code})")
    return None


def _log_gateway_end(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("Discord gateway connection ended: %s", task.exception())


def configure_sync_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--guild",
        type=int,
        metavar="ID",
        help="register in this server only (instant); without it, globally (takes up to an hour)",
    )


def run_sync(args: argparse.Namespace, settings: Settings) -> int:
    """``chatglm-bot discord-sync``: register the slash commands and print the invite link."""
    adapter = DiscordAdapter(settings)
    try:
        application_id, names = asyncio.run(adapter.sync(args.guild))
    except discord.HTTPException as exc:
        print(f"error: Discord refused the command registration: {exc}", file=sys.stderr)
        return 1
    where = f"in server {args.guild} (available now)" if args.guild else "globally (may take up to an hour)"
    print(f"Registered {', '.join('/' + name for name in names)} {where}.")
    print(f"Invite link: {invite_url(application_id)}")
    return 0
