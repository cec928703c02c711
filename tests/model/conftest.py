from collections.abc import Iterator

import pytest

from bot.model.kernels import vnni


@pytest.fixture
def no_kernel() -> Iterator[None]:
    """The VNNI kernel switched off, as on a machine without it; restored afterwards."""
    vnni.configure(enabled=False)
    try:
        yield
    finally:
        vnni.configure(enabled=True)
