"""The kernels' switches under their first import path, for bot/app.py and bot/doctor.py; they live in
build.py (the engine itself imports build, layout and ops)."""

from bot.model.kernels.build import ISA_FLAGS, available, backend_name, configure

__all__ = ["ISA_FLAGS", "available", "backend_name", "configure"]
