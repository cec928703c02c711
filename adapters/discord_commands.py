"""The slash commands (/ask, /reset, /help), who may reset, and the bot's invite link.

The command tree is built on every start so discord.py can dispatch interactions to it, but it
is registered with Discord only by ``chatglm-bot discord-sync`` (see ``DiscordAdapter.sync``):
registration is rate limited and a global one takes up to an hour to reach every client.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Final, Protocol

import discord
from discord import app_commands

# What the bot needs in a channel: see it, read the message it replies to, answer there and in
# threads. Interaction responses need no channel permission of their own.
INVITE_PERMISSIONS: Final = discord.Permissions(
    view_channel=True,
    send_messages=True,
    send_messages_in_threads=True,
    read_message_history=True,
)
INVITE_SCOPES: Final = ("bot", "applications.commands")


class CommandTarget(Protocol):
    """What the commands call into (the adapter)."""

    async def ask(self, interaction: discord.Interaction[discord.Client], prompt: str) -> None: ...

    async def reset(self, interaction: discord.Interaction[discord.Client]) -> None: ...

    async def help(self, interaction: discord.Interaction[discord.Client]) -> None: ...


def build_tree(client: discord.Client, target: CommandTarget) -> app_commands.CommandTree[discord.Client]:
    tree: app_commands.CommandTree[discord.Client] = app_commands.CommandTree(client)

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
