"""Unit tests for the job spec: loading, path resolution, validation messages, fingerprints."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from harvest.jobfile import load_job
from schemas.job import JobSpec, SpecError, parse_job

AUTH = {"owner": "ACME", "license": "apache-2.0", "attestation": "we trained it"}


def job(**top: Any) -> dict[str, Any]:
    """A minimal valid job document, with top-level sections replaced by ``top``."""
    doc: dict[str, Any] = {
        "input": {"path": "prompts.jsonl"},
        "teacher": {"model": "tiny", "endpoints": ["http://h:8000"], "authorization": AUTH},
    }
    doc.update(top)
    return doc


def teacher(**over: Any) -> dict[str, Any]:
    return {**job()["teacher"], **over}


def write_yaml(path: Path, doc: Any) -> Path:
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    return path


def rejected(doc: Any) -> bool:
    try:
        parse_job(doc)
    except SpecError:
        return True
    return False


def spec_error(doc: Any) -> str:
    with pytest.raises(SpecError) as exc:
        parse_job(doc, "job.yaml")
    return str(exc.value)


# --- loading and path resolution ---------------------------------------------------------------


def test_minimal_yaml_loads_and_resolves_paths_against_job_folder(tmp_path: Path) -> None:
    sub = tmp_path / "jobs"
    sub.mkdir()
    doc = job(output={"dir": "results"})
    doc["input"] = {"path": "data/*.jsonl"}
    spec = load_job(write_yaml(sub / "job.yaml", doc))
    assert spec.input.path == str(sub.resolve() / "data" / "*.jsonl")
    assert spec.output.dir == str(sub.resolve() / "results")
    assert spec.teacher.model == "tiny"
    assert spec.teacher.endpoints == ["http://h:8000/v1"]
    assert spec.teacher.authorization.owner == "ACME"
    # defaults
    assert spec.input.prompt_field == "prompt"
    assert spec.sampling.logprobs == 5
    assert spec.output.compression == "zstd"
    assert spec.concurrency.workers == 2


def test_default_output_dir_resolves_against_job_folder(tmp_path: Path) -> None:
    spec = load_job(write_yaml(tmp_path / "job.yaml", job()))
    assert spec.output.dir == str(tmp_path.resolve() / "out")


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    doc = job(input={"path": "/data/p.jsonl"}, output={"dir": "/srv/out"})
    spec = load_job(write_yaml(tmp_path / "job.yaml", doc))
    assert (spec.input.path, spec.output.dir) == ("/data/p.jsonl", "/srv/out")


def test_uris_are_not_turned_into_local_paths(tmp_path: Path) -> None:
    doc = job(input={"path": "s3://bkt/in/*.parquet"}, output={"dir": "gs://bkt/out/run-1"})
    spec = load_job(write_yaml(tmp_path / "job.yaml", doc))
    assert (spec.input.path, spec.output.dir) == ("s3://bkt/in/*.parquet", "gs://bkt/out/run-1")


@pytest.mark.parametrize("where", ["input", "output"])
def test_credentials_in_a_uri_are_rejected_without_echoing_them(where: str) -> None:
    uri = "s3://AKIAEXAMPLE:verysecretvalue@bkt/x.jsonl"
    doc = job(input={"path": uri}) if where == "input" else job(output={"dir": uri})
    msg = spec_error(doc)
    assert "credentials do not belong in a location" in msg
    assert "verysecretvalue" not in msg


def test_input_string_shorthand(tmp_path: Path) -> None:
    spec = load_job(write_yaml(tmp_path / "job.yaml", job(input="x.jsonl")))
    assert spec.input.path == str(tmp_path.resolve() / "x.jsonl")
    assert spec.input.id_field == "id"
    assert parse_job(job(input="y.jsonl")).input.path == "y.jsonl"  # unresolved without a file


def test_json_job_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job(input="p.jsonl")), encoding="utf-8")
    spec = load_job(path)
    assert spec.input.path == str(tmp_path.resolve() / "p.jsonl")
    assert spec.teacher.endpoints == ["http://h:8000/v1"]


def test_tab_indented_json_job_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job(), indent="\t"), encoding="utf-8")
    assert load_job(path).teacher.model == "tiny"


def test_missing_job_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match="job file not found") as exc:
        load_job(path)
    assert str(path) in str(exc.value)


def test_invalid_yaml_names_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("input: [unclosed\n  teacher: {", encoding="utf-8")
    with pytest.raises(SpecError, match="not valid YAML") as exc:
        load_job(path)
    assert str(exc.value).startswith(f"{path}:")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_non_mapping_document_rejected(tmp_path: Path, text: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(SpecError, match="expected a mapping at the top level") as exc:
        load_job(path)
    assert str(path) in str(exc.value)


# --- validation messages -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("doc", "dotted"),
    [
        (job(sampling={"temprature": 0.5}), "sampling.temprature"),
        (job(inputs="x.jsonl"), "inputs"),
        (job(teacher=teacher(modle="x")), "teacher.modle"),
        (
            job(teacher=teacher(authorization={**AUTH, "signer": "x"})),
            "teacher.authorization.signer",
        ),
        (job(input={"path": "p.jsonl", "prompt_col": "q"}), "input.prompt_col"),
    ],
)
def test_unknown_key_at_any_depth_is_named(doc: dict[str, Any], dotted: str) -> None:
    msg = spec_error(doc)
    assert msg.startswith("job.yaml: ")
    assert f"{dotted}: unknown key" in msg


def test_missing_authorization_is_named() -> None:
    doc = job()
    del doc["teacher"]["authorization"]
    assert "teacher.authorization: Field required" in spec_error(doc)


def test_empty_authorization_field_rejected() -> None:
    msg = spec_error(job(teacher=teacher(authorization={**AUTH, "license": ""})))
    assert "teacher.authorization.license" in msg


def test_several_errors_are_all_reported() -> None:
    msg = spec_error(job(sampling={"logprobs": 5000, "top_p": 0}))
    assert "sampling.logprobs" in msg
    assert "sampling.top_p" in msg


# --- endpoints ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://h:8000", "http://h:8000/v1"),
        ("http://h:8000/", "http://h:8000/v1"),
        ("http://h:8000/v1/", "http://h:8000/v1"),
        ("https://teacher.internal/openai/v1//", "https://teacher.internal/openai/v1"),
        ("  http://10.0.0.5:8000/v1  ", "http://10.0.0.5:8000/v1"),
    ],
)
def test_endpoint_normalisation(given: str, expected: str) -> None:
    spec = parse_job(job(teacher=teacher(endpoints=[given])))
    assert spec.teacher.endpoints == [expected]


@pytest.mark.parametrize("url", ["ftp://h:8000", "h:8000", "localhost", "http://", "file:///v1"])
def test_non_http_endpoint_rejected(url: str) -> None:
    msg = spec_error(job(teacher=teacher(endpoints=[url])))
    assert "teacher.endpoints" in msg
    assert "not an http(s) URL" in msg


def test_empty_endpoint_list_rejected() -> None:
    assert "either endpoints" in spec_error(job(teacher=teacher(endpoints=[])))


def test_replicas_instead_of_endpoints() -> None:
    replicas = {"count": 2, "model": "/models/m", "vllm_args": ["--dtype", "bfloat16"]}
    spec = parse_job(job(teacher=teacher(endpoints=[], replicas=replicas)))
    assert spec.teacher.replicas.count == 2 and spec.teacher.replicas.resources.num_gpus == 0
    both = job(teacher=teacher(replicas=replicas))
    assert "either endpoints" in spec_error(both)
    reserved = {**replicas, "vllm_args": ["--port=9000"]}
    assert "--port is set by the replica" in spec_error(
        job(teacher=teacher(endpoints=[], replicas=reserved))
    )


@pytest.mark.parametrize(
    "pair",
    [["http://h:8000", "http://h:8000"], ["http://h:8000", "http://h:8000/v1/"]],
)
def test_duplicate_endpoints_rejected(pair: list[str]) -> None:
    assert "endpoints are listed twice" in spec_error(job(teacher=teacher(endpoints=pair)))


def test_duplicate_endpoints_differing_in_host_case_rejected() -> None:
    assert rejected(job(teacher=teacher(endpoints=["http://H:8000", "http://h:8000"])))


# --- api_key_env -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "key2", "_X"])
def test_api_key_env_accepts_variable_names(name: str) -> None:
    assert parse_job(job(teacher=teacher(api_key_env=name))).teacher.api_key_env == name


def test_api_key_env_defaults_to_none() -> None:
    assert parse_job(job()).teacher.api_key_env is None


@pytest.mark.parametrize("value", ["sk-abc 123", "sk-proj-abcdef", "", "MY KEY", "a.b"])
def test_api_key_env_rejects_non_names_without_echoing_them(value: str) -> None:
    msg = spec_error(job(teacher=teacher(api_key_env=value)))
    assert "teacher.api_key_env" in msg
    assert "must be an environment variable name, not a key" in msg
    if value:
        assert value not in msg  # a pasted key must not end up in logs


@pytest.mark.parametrize("value", ["0a1b2c3d4e5f", "KÉY"])
def test_api_key_env_rejects_invalid_names(value: str) -> None:
    assert rejected(job(teacher=teacher(api_key_env=value)))


# --- ranges ------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 20])
def test_logprobs_in_range(k: int) -> None:
    assert parse_job(job(sampling={"logprobs": k})).sampling.logprobs == k


@pytest.mark.parametrize("k", [-1, 1025])
def test_logprobs_out_of_range(k: int) -> None:
    assert "sampling.logprobs" in spec_error(job(sampling={"logprobs": k}))


@pytest.mark.parametrize(
    ("section", "values", "dotted"),
    [
        ("sampling", {"n": 0}, "sampling.n"),
        ("sampling", {"n": 65}, "sampling.n"),
        ("sampling", {"top_p": 1.5}, "sampling.top_p"),
        ("sampling", {"temperature": -0.1}, "sampling.temperature"),
        ("output", {"compression": "brotli"}, "output.compression"),
        ("output", {"rows_per_shard": 0}, "output.rows_per_shard"),
        ("concurrency", {"workers": 0}, "concurrency.workers"),
    ],
)
def test_out_of_range_values_named(section: str, values: dict[str, Any], dotted: str) -> None:
    assert f"{dotted}: " in spec_error(job(**{section: values}))


def test_spec_is_frozen() -> None:
    spec = parse_job(job())
    with pytest.raises(ValueError):
        spec.sampling.temperature = 0.0  # type: ignore[misc]


# --- JSON schema -------------------------------------------------------------------------------


def test_every_property_of_every_model_has_a_description() -> None:
    schema = JobSpec.model_json_schema()
    models = {"JobSpec": schema, **schema["$defs"]}
    assert set(models) >= {
        "JobSpec",
        "InputSpec",
        "TeacherSpec",
        "Authorization",
        "SamplingSpec",
        "OutputSpec",
        "ConcurrencySpec",
    }
    missing = [
        f"{model}.{name}"
        for model, body in models.items()
        for name, prop in body["properties"].items()
        if not str(prop.get("description", "")).strip()
    ]
    assert missing == []
    assert schema["additionalProperties"] is False
    assert all(body["additionalProperties"] is False for body in schema["$defs"].values())


# --- fingerprint -------------------------------------------------------------------------------


def fp(doc: dict[str, Any]) -> str:
    return parse_job(doc).fingerprint()


def test_fingerprint_is_stable() -> None:
    assert fp(job()) == fp(copy.deepcopy(job()))
    assert len(fp(job())) == 16


@pytest.mark.parametrize(
    "change",
    [
        {"sampling": {"temperature": 0.5}},
        {"sampling": {"seed": 1}},
        {"sampling": {"logprobs": 6}},
        {"sampling": {"stop": ["\n"]}},
        {"teacher": teacher(model="bigger")},
        {"input": {"path": "prompts.jsonl", "prompt_field": "text"}},
        {"output": {"logprob_dtype": "float16"}},  # one schema per output
    ],
)
def test_fingerprint_changes_with_content_deciding_fields(change: dict[str, Any]) -> None:
    assert fp(job(**change)) != fp(job())


@pytest.mark.parametrize(
    "change",
    [
        {"output": {"dir": "elsewhere"}},
        {"output": {"compression": "snappy"}},
        {"output": {"logprob_dtype": "float32"}},  # the default, spelled out: old outputs resume
        {"input": {"path": "other/*.jsonl"}},
        {"teacher": teacher(endpoints=["http://other:9000"])},
        {"teacher": teacher(timeout_s=5)},
        {"concurrency": {"workers": 8}},
    ],
)
def test_fingerprint_ignores_operational_fields(change: dict[str, Any]) -> None:
    assert fp(job(**change)) == fp(job())


def test_fingerprint_unaffected_by_path_resolution(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    doc = job(output={"dir": "out-a"})
    other = job(output={"dir": "/abs/out-b"})
    assert load_job(write_yaml(a / "job.yaml", doc)).fingerprint() == (
        load_job(write_yaml(b / "job.yaml", other)).fingerprint()
    )


def test_fingerprint_changes_with_rows_per_shard() -> None:
    assert fp(job(output={"rows_per_shard": 10})) != fp(job())


# --- score mode --------------------------------------------------------------------------------


def test_mode_defaults_to_generate_and_generate_fingerprints_are_unchanged() -> None:
    """Outputs harvested before score mode existed still resume: same fingerprint as then."""
    assert parse_job(job()).mode == "generate"
    assert fp(job()) == "1243f14ba1e78cfc"  # computed with the code before score mode
    assert fp(job(input={"path": "prompts.jsonl", "response_field": "answer"})) == fp(job())


def test_score_mode_enters_the_fingerprint_with_its_response_column() -> None:
    scored = fp(job(mode="score"))
    assert scored != fp(job())
    answer = job(mode="score", input={"path": "prompts.jsonl", "response_field": "answer"})
    assert fp(answer) != scored


def test_score_mode_refuses_several_samples_and_unknown_modes() -> None:
    with pytest.raises(SpecError, match=r"score mode .* sampling\.n must be 1"):
        parse_job(job(mode="score", sampling={"n": 2}))
    with pytest.raises(SpecError, match="mode"):
        parse_job(job(mode="distil"))


@pytest.mark.parametrize("k", [1, 20, 64, 128, 1024])
def test_any_k_up_to_the_sanity_bound_is_accepted(k: int) -> None:
    assert parse_job(job(sampling={"logprobs": k})).sampling.logprobs == k


def test_a_k_past_the_sanity_bound_is_refused() -> None:
    assert "sampling.logprobs" in spec_error(job(sampling={"logprobs": 1025}))


def test_the_top_k_encoding_is_part_of_the_fingerprint() -> None:
    plain = parse_job(job())
    compact = parse_job(job(output={"topk_encoding": "compact"}))
    assert plain.output.topk_encoding == "float32"
    assert plain.fingerprint() != compact.fingerprint()
    assert "output.topk_encoding" in spec_error(job(output={"topk_encoding": "zip"}))
