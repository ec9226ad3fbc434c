"""Every layer test runs twice: layers inflated in a thread, and in a child process."""

from __future__ import annotations

import pytest

from hpcsif.image import inflate


@pytest.fixture(autouse=True, params=["thread", "process"])
def inflater(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``process``: every compressed layer, however small, goes through :mod:`hpcsif.image.inflate`."""
    monkeypatch.setattr(inflate, "MIN_BYTES", 0 if request.param == "process" else 1 << 62)
    return request.param
