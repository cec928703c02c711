"""The slash commands (/ask, /reset, /help), who may reset, and the bot's invite link.

Every interaction gets a response, even one the tree cannot run: a command whose registration
is older or newer than this code, an unknown command, an autocomplete request (no option has
suggestions). Those, and interactions already answered or expired, are logged on one line.

The command tree is built on every start so discord.py can dispatch interactions to it, but it
is registered with Discord only by ``chatglm-bot discord-sync`` (see ``DiscordAdapter.sync``):
registration is rate limited and a global one takes up to an hour to reach every client.
"""

from __future__ import annotations

import logging
from collections.abc import Set
from typing import Final, Protocol

import aiohttp
import discord
from discord import app_commands

from adapters.discord_reply import NO_MENTIONS
from bot.core import FAILURE_TEXT

log = logging.getLogger(__name__)

# What the bot needs in a channel: see it, read the message it replies to, answer there and in
# threads. Interaction responses need no channel permission of their own.
INVITE_PERMISSIONS: Final = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    read_message_history=True,
)
INVITE_SCOPES: Final = ("bot", "applications.commands")
STALE_COMMAND: Final = "This command changed; an admin needs to run `chatglm-bot discord-sync`."
# Discord's error codes for an interaction that can no longer be responded to.
UNKNOWN_INTERACTION: Final = 10062
ALREADY_ACKNOWLEDGED: Final = 40060


def unknown_command(name: str) -> str:
    return f"Unknown command `/{name}`; an admin needs to run `chatglm-bot discord-sync`."


class CommandTarget(Protocol):
    """What the commands call into (the adapter)."""

    async def ask(self, interaction: discord.Interaction[discord.Client], prompt: str) -> None: ...

    async def reset(self, interaction: discord.Interaction[discord.Client]) -> None: ...

    async def help(self, interaction: discord.Interaction[discord.Client]) -> None: ...


class _Tree(app_commands.CommandTree[discord.Client]):
    async def interaction_check(self, interaction: discord.Interaction[discord.Client], /) -> bool:
        if interaction.type is not discord.InteractionType.autocomplete:
            return True
        try:
            await interaction.response.autocomplete([])
        except (discord.DiscordException, aiohttp.ClientError) as exc:
            log.debug("Discord: autocomplete %s not answered: %s", interaction.id, exc)
        return False

    async def on_error(
        self, interaction: discord.Interaction[discord.Client], error: app_commands.AppCommandError, /
    ) -> None:
        command = interaction.command
        name = command.qualified_name if command is not None else "?"
        if isinstance(error, app_commands.CommandSignatureMismatch | app_commands.TransformerError):
            log.warning("Discord: /%s does not match its registration; run chatglm-bot discord-sync", name)
            await _explain(interaction, STALE_COMMAND)
        elif isinstance(error, app_commands.CommandNotFound):
            log.warning("Discord: unknown command /%s; run chatglm-bot discord-sync", error.name)
            await _explain(interaction, unknown_command(error.name))
        elif isinstance(error, app_commands.CommandInvokeError) and _unanswerable(error.original):
            log.warning(
                "Discord: /%s interaction %s was already answered or has expired (%s)",
                name,
                interaction.id,
                error.original,
            )
        else:
            log.error("Discord: /%s failed", name, exc_info=error)
            await _explain(interaction, FAILURE_TEXT)


def _unanswerable(error: BaseException) -> bool:
    """A replayed interaction (already responded to) or one whose token has expired."""
    if isinstance(error, discord.InteractionResponded):
        return True
    return isinstance(error, discord.HTTPException) and error.code in (
        UNKNOWN_INTERACTION,
        ALREADY_ACKNOWLEDGED,
    )


async def _explain(interaction: discord.Interaction[discord.Client], text: str) -> None:
    """An ephemeral note to the user; its cause is logged already, so a failed send only at DEBUG."""
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
        else:
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_MENTIONS)
    except (discord.DiscordException, aiohttp.ClientError) as exc:
        log.debug("Discord: interaction %s not answered: %s", interaction.id, exc)


def build_tree(client: discord.Client, target: CommandTarget) -> app_commands.CommandTree[discord.Client]:
    tree = _Tree(client)

    @tree.command(name="ask", description="Ask the bot; this channel (or thread) is the conversation")
    @app_commands.describe(prompt="Your message to the bot")
    async def ask(interaction: discord.Interaction[discord.Client], prompt: str) -> None:
        await target.ask(interaction, prompt)

    @tree.command(name="reset", description="Forget this channel's (or thread's) conversation")
    async def reset(interaction: discord.Interaction[discord.Client]) -> None:
        await target.reset(interaction)

    @tree.command(name="help", description="How to use the bot")
    async def help(interaction: discord.Interaction[discord.Client]) -> None:
        await target.help(interaction)

    return tree


def may_reset(interaction: discord.Interaction[discord.Client], admin_ids: Set[str]) -> bool:
    """Configured admins and members with Manage Messages here; anyone in their own DM."""
    if str(interaction.user.id) in admin_ids or interaction.guild_id is None:
        return True
    return interaction.permissions.manage_messages


def may_reset_by_message(message: discord.Message, admin_ids: Set[str]) -> bool:
    """The same rule as ``may_reset`` for the author of a mention or DM (the core decides whether
    the message asks for a reset)."""
    author = message.author
    if str(author.id) in admin_ids or message.guild is None:
        return True
    return isinstance(author, discord.Member) and message.channel.permissions_for(author).manage_messages


def invite_url(application_id: int) -> str:
    return discord.utils.oauth_url(application_id, permissions=INVITE_PERMISSIONS, scopes=INVITE_SCOPES)
