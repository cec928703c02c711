from collections.abc import Iterator

import pytest

from bot.model.kernels import build


@pytest.fixture
def no_kernel() -> Iterator[None]:
    """The native kernel switched off, as on a machine without it; restored afterwards."""
    build.configure(enabled=False)
    try:
        yield
    finally:
        build.configure(enabled=True)
