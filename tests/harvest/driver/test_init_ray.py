"""A private Ray cluster runs harvest workers at normal priority unless told otherwise."""

from __future__ import annotations

import pytest

from harvest.driver import cluster


@pytest.fixture
def fake_ray(monkeypatch):
    calls = []
    monkeypatch.setattr(cluster.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster.ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_private_cluster_workers_are_not_niced(fake_ray, monkeypatch):
    monkeypatch.delenv("RAY_worker_niceness", raising=False)
    cluster.init_ray(None)
    assert fake_ray and fake_ray[0]["address"] == "local"
    assert cluster.os.environ["RAY_worker_niceness"] == "0"


def test_an_explicit_niceness_is_kept(fake_ray, monkeypatch):
    monkeypatch.setenv("RAY_worker_niceness", "15")
    cluster.init_ray(None)
    assert cluster.os.environ["RAY_worker_niceness"] == "15"
