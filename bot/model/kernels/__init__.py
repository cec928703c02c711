"""Compiled CPU kernels for the model's int4 linears (see native.py)."""

from bot.model.kernels.native import PackedInt4, available, backend_name, configure, int4_linear

__all__ = ["PackedInt4", "available", "backend_name", "configure", "int4_linear"]
