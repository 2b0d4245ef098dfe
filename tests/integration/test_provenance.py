"""Provenance and secrets, against the real vLLM server: what the shards say, what they hide."""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pyarrow.parquet as pq
import pytest
from test_harvest_e2e import write_inputs, write_job

from harvest.cli import main
from harvest.training import reader
from harvest.training.reader import MixedTeachersError
from schemas.records import METADATA_KEY
from workers.shards.columns import read_metadata

pytestmark = pytest.mark.integration

SECRET = "sk-test-9f8e7d6c5b4a-never-written-anywhere"


@pytest.fixture(scope="module")
def keyed_run(tmp_path_factory, tiny_teacher, ray_cluster):
    """A harvest whose API key comes from the environment (vLLM ignores it: no --api-key)."""
    folder = tmp_path_factory.mktemp("keyed")
    write_inputs(folder, count=12)
    job = write_job(folder, tiny_teacher, output={"dir": "out", "rows_per_shard": 8})
    text = job.read_text().replace("  model: tiny\n", "  model: tiny\n  api_key_env: TH_TEST_KEY\n")
    job.write_text(text)
    mp = pytest.MonkeyPatch()
    mp.setenv("TH_TEST_KEY", SECRET)
    try:
        code = main(["run", str(job), "--no-progress"])
        validated = main(["validate", str(job)])
    finally:
        mp.undo()
    return folder, code, validated


def test_key_is_never_written(keyed_run, capsys, ray_cluster):
    import ray

    folder, code, validated = keyed_run
    assert code == 0 and validated == 0
    assert SECRET not in capsys.readouterr().out
    written = [p for p in folder.rglob("*") if p.is_file()]
    assert any(p.suffix == ".parquet" for p in written)
    assert any(p.parent.name == "commits" for p in written)  # the manifest's objects too
    session_logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    scanned = written + [p for p in session_logs.rglob("*") if p.is_file()]
    assert len(scanned) > len(written)  # Ray's worker logs were scanned too
    leaks = [p for p in scanned if SECRET.encode() in p.read_bytes()]
    assert leaks == []


def test_missing_key_variable_is_a_clear_error(tmp_path, tiny_teacher, capsys):
    write_inputs(tmp_path, count=2)
    job = write_job(tmp_path, tiny_teacher)
    job.write_text(
        job.read_text().replace("  model: tiny\n", "  model: tiny\n  api_key_env: TH_UNSET_KEY\n")
    )
    assert main(["run", str(job), "--no-progress"]) == 2
    assert "TH_UNSET_KEY is not set" in capsys.readouterr().err


def test_provenance_command_shows_teacher_licence_and_tokenizer(keyed_run, capsys):
    out = keyed_run[0] / "out"
    assert main(["provenance", str(out)]) == 0
    text = capsys.readouterr().out
    assert "teacher:         tiny" in text
    assert "licence:         apache-2.0" in text
    assert "all shards agree" in text
    meta = read_metadata(reader.data_files(out)[0])
    tok_hash = meta["teacher"]["tokenizer_hash"]
    assert tok_hash and len(tok_hash) == 16 and f"tokenizer hash:  {tok_hash}" in text
    assert meta["teacher"]["chat_template_hash"] in text
    assert meta["teacher"]["model_root"].endswith("tiny-llama")


def _restamp(path: Path, **teacher_changes) -> None:
    table = pq.read_table(path)
    meta = orjson.loads(table.schema.metadata[METADATA_KEY])
    meta["teacher"] = {**meta["teacher"], **teacher_changes}
    table = table.replace_schema_metadata({METADATA_KEY: orjson.dumps(meta)})
    pq.write_table(table, path)


def test_reader_refuses_to_mix_teachers(keyed_run, tmp_path, capsys):
    out = keyed_run[0] / "out"
    other = tmp_path / "other"
    shutil.copytree(out, other)
    for path in reader.data_files(other):
        _restamp(Path(path), tokenizer_hash="0000000000000000")
    with pytest.raises(MixedTeachersError, match="different teachers or tokenizers"):
        reader.read_table([out, other])
    mixed = reader.read_table([out, other], allow_mixed=True)
    assert mixed.num_rows == 2 * reader.read_table(out).num_rows

    disagreeing = tmp_path / "disagreeing"
    shutil.copytree(out, disagreeing)
    _restamp(Path(reader.data_files(disagreeing)[0]), tokenizer_hash="1111111111111111")
    assert main(["provenance", str(disagreeing)]) == 1
    assert "DISAGREEMENT" in capsys.readouterr().out
