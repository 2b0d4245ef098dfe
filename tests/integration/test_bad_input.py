"""Bad input gets a clear one-line error or a failure row: never a traceback, never a drop."""

from __future__ import annotations

import json

import pytest
import yaml
from test_harvest_e2e import write_job

from harvest.cli import main
from harvest.training import reader
from workers.replica.vllm_server import free_port

pytestmark = pytest.mark.integration

GOOD = [{"prompt": "A fine prompt"}, {"messages": [{"role": "user", "content": "hello"}]}]
LONG = "word " * 20_000  # 100k characters: far past the 1,024-token context


def bad_lines() -> list[bytes]:
    return [
        b'{"prompt": "unterminated\n',  # malformed JSON
        b'{"prompt": "caf\xe9 latin-1 bytes"}\n',  # invalid UTF-8
        b'{"prompt": ""}\n',  # empty prompt
        b'{"text": "no prompt field"}\n',  # missing fields
        b'{"prompt": ["a", "list"]}\n',  # wrong type
        b'{"messages": [{"role": "wizard", "content": "x"}]}\n',  # bad role
        b'{"prompt": "x", "sampling": {"temperature": "hot"}}\n',  # bad override
        b"[1, 2, 3]\n",  # not an object
        json.dumps({"id": "long", "prompt": LONG}).encode() + b"\n",  # teacher says 400
    ]


def test_every_bad_row_is_a_failure_record(tmp_path, tiny_teacher, ray_cluster, capsys):
    lines = [json.dumps(r).encode() + b"\n" for r in GOOD] + bad_lines()
    (tmp_path / "prompts.jsonl").write_bytes(b"".join(lines))
    job = write_job(tmp_path, tiny_teacher, output={"dir": "out", "rows_per_shard": 6})
    assert main(["run", str(job), "--no-progress"]) == 3
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    assert "completed with failures" in captured.out

    data = reader.read_table(tmp_path / "out").to_pylist()
    failed = reader.read_table(tmp_path / "out", "failed").to_pylist()
    assert len(data) == len(GOOD) * 2
    assert len(failed) == len(bad_lines()) * 2  # n=2: one record per expected sample
    by_id = {r["prompt_id"]: r for r in failed}
    assert set(by_id) == {f"prompts.jsonl:{i}" for i in range(3, 11)} | {"long"}
    reasons = {pid: (r["error_class"], r["message"]) for pid, r in by_id.items()}
    assert reasons["long"][0] == "BadRequest" and by_id["long"]["http_status"] == 400
    assert by_id["long"]["prompt"] == LONG  # the failure keeps the prompt for retry-failed
    expected = {
        3: "malformed JSON",
        4: "malformed JSON",  # invalid UTF-8 is rejected by the JSON decoder, with its offset
        5: "is empty",
        6: "neither 'prompt' nor 'messages'",
        7: "must be a string",
        8: "role' must be one of",
        9: "sampling.temperature",
        10: "expected a JSON object",
    }
    for line, text in expected.items():
        cls, message = reasons[f"prompts.jsonl:{line}"]
        assert cls == "InvalidInput" and text in message, (line, message)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("missing", "no file matches"),
        ("empty", "no rows in"),
        ("wrong_model", "does not serve model 'nope'"),
    ],
)
def test_job_level_problems_are_one_line_errors(setup, message, tmp_path, tiny_teacher, capsys):
    (tmp_path / "prompts.jsonl").write_text("" if setup == "empty" else '{"prompt": "x"}\n')
    job = write_job(tmp_path, tiny_teacher)
    text = job.read_text()
    if setup == "missing":
        text = text.replace("input: prompts.jsonl", "input: nowhere/*.jsonl")
    if setup == "wrong_model":
        text = text.replace("model: tiny", "model: nope")
    job.write_text(text)
    assert main(["run", str(job), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("harvest: error:") and message in err
    assert "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out" / "data").exists()


def test_a_teacher_that_never_answers_stops_the_job_after_the_outage_timeout(
    tmp_path, capsys, ray_cluster
):
    """Down when the job starts is treated as down mid-job (it may be restarting): waited for
    up to teacher.outage_timeout_s, then exit 1 and one line naming the endpoint."""
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "x"}\n')
    url = f"http://127.0.0.1:{free_port()}/v1"
    job = write_job(tmp_path, url)
    spec = yaml.safe_load(job.read_text())
    spec["teacher"]["outage_timeout_s"] = 1
    job.write_text(yaml.safe_dump(spec))
    assert main(["run", str(job), "--no-progress"]) == 1
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("harvest: error:")]
    assert len(lines) == 1 and url in lines[0] and "did not answer for 1 s" in lines[0]
    assert "teacher.outage_timeout_s" in lines[0] and "ConnectError" in lines[0]
    assert not (tmp_path / "out" / "data").exists()
