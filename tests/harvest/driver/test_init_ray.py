"""A private Ray cluster runs harvest workers at normal priority unless told otherwise."""

from __future__ import annotations

import pytest

from harvest.driver import scheduler


@pytest.fixture
def fake_ray(monkeypatch):
    calls = []
    monkeypatch.setattr(scheduler.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(scheduler.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_private_cluster_workers_are_not_niced(fake_ray, monkeypatch):
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    scheduler.init_ray(None)
    assert fake_ray and fake_ray[0]["address"] == "local"
    assert scheduler.os.environ["RAY_worker_niceness"] == "0"


def test_an_explicit_niceness_is_kept(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_worker_niceness", "15")
    scheduler.init_ray(None)
    assert scheduler.os.environ["RAY_worker_niceness"] == "15"
