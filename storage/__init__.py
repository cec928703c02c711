"""Conversation history and event dedupe in SQL: SQLite by default, PostgreSQL by URL."""

from storage.repository import ClaimResult, EventStatus, Storage, StoredTurn

__all__ = ["ClaimResult", "EventStatus", "Storage", "StoredTurn"]
