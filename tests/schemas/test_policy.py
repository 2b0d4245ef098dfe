"""Authorised-use policy: which endpoints a job may use, decided before any connection."""

from __future__ import annotations

import socket

import pytest
import yaml

from harvest.cli import main
from schemas.job import SpecError, parse_job


def job(endpoints: list[str], **auth) -> dict:
    return {
        "input": "x.jsonl",
        "teacher": {
            "model": "m",
            "endpoints": endpoints,
            "authorization": {"owner": "o", "license": "l", "attestation": "a", **auth},
        },
    }


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000",
        "http://localhost:8000",
        "http://[::1]:8000",
        "http://10.0.0.5:8000",
        "http://172.16.3.4",
        "http://192.168.1.20:8000",
        "http://gpu-node-3:8000",
        "http://vllm-0.vllm.default.svc.cluster.local:8000",
        "http://teacher.internal",
    ],
)
def test_loopback_private_and_cluster_names_need_no_listing(url):
    assert parse_job(job([url])).teacher.endpoints


def test_public_host_must_be_allow_listed():
    with pytest.raises(SpecError, match=r"teacher\.example\.com is not loopback.*allowed_hosts"):
        parse_job(job(["https://teacher.example.com/v1"]))
    spec = parse_job(job(["https://teacher.example.com/v1"], allowed_hosts=["Teacher.Example.com"]))
    assert spec.teacher.endpoints == ["https://teacher.example.com/v1"]


@pytest.mark.parametrize(
    "url",
    ["https://api.openai.com/v1", "https://myorg.openai.azure.com", "https://api.anthropic.com"],
)
def test_hosted_llm_apis_are_refused_even_when_listed(url):
    host = url.split("/")[2]
    with pytest.raises(SpecError, match="provider_agreement"):
        parse_job(job([url], allowed_hosts=[host]))
    spec = parse_job(job([url], provider_agreement="MSA-2026-017 permits distillation"))
    assert spec.teacher.authorization.provider_agreement.startswith("MSA")


@pytest.mark.parametrize("missing", ["owner", "license", "attestation"])
def test_allow_listing_without_a_full_authorization_fails(missing):
    data = job(["https://teacher.example.com"], allowed_hosts=["teacher.example.com"])
    del data["teacher"]["authorization"][missing]
    with pytest.raises(SpecError, match=f"teacher.authorization.{missing}"):
        parse_job(data)


def test_refused_job_never_opens_a_connection(tmp_path, monkeypatch):
    attempts = []
    real_connect = socket.socket.connect

    def record(self, address):
        attempts.append(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", record)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: attempts.append(a))
    (tmp_path / "x.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job(["https://teacher.example.com/v1"])))
    assert main(["run", str(tmp_path / "job.yaml"), "--no-progress"]) == 2
    assert attempts == []
    assert not (tmp_path / "out").exists()
