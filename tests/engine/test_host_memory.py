"""Host allocator tuning for CPU inference."""

from __future__ import annotations

import platform

import pytest

from engine.host_memory import keep_freed_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="mallopt is glibc's")
def test_tuning_applies_on_glibc_and_is_idempotent():
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True


def test_opt_out(monkeypatch):
    monkeypatch.setenv("PILOT_MALLOC_TUNING", "0")
    assert keep_freed_memory() is False
