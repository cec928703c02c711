from collections.abc import Iterator

import pytest

from bot.model.kernels import native


@pytest.fixture
def no_kernel() -> Iterator[None]:
    """The native kernel switched off, as on a machine without it; restored afterwards."""
    native.configure(enabled=False)
    try:
        yield
    finally:
        native.configure(enabled=True)
