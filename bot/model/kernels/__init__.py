"""Compiled CPU kernels for the model's int4 linears (see vnni.py)."""

from bot.model.kernels.vnni import PackedInt4, available, backend_name, configure, int4_linear

__all__ = ["PackedInt4", "available", "backend_name", "configure", "int4_linear"]
