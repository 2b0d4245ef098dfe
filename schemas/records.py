"""The Arrow schemas of data and failure shards: the contract training code reads.

One explicit schema, versioned. Bump ``SCHEMA_VERSION`` on any change a reader could notice.
``top_token_ids`` / ``top_logprobs`` are fixed-size lists of exactly K per token, K fixed per
job, so training code can turn a row into a ``[tokens, K]`` array without padding logic.
"""

from __future__ import annotations

import pyarrow as pa

# 3: the nullable student_logprobs and tail_logprob columns, and the compact top-K encoding
# (top_k_compact in place of top_token_ids / top_logprobs). 2: prompt_token_ids filled.
SCHEMA_VERSION = "3"
METADATA_KEY = b"teacher_harvest"

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])


LOGPROB_TYPES = {"float32": pa.float32(), "float16": pa.float16()}


TOPK_ENCODINGS = ("float32", "compact")
# The compact encoding's one column in place of top_token_ids / top_logprobs (a binary blob per
# record, workers/shards/topk_codec.py); its field metadata holds K.
TOPK_COMPACT_COLUMN = "top_k_compact"


def record_schema(
    k: int, logprob_dtype: str = "float32", topk_encoding: str = "float32"
) -> pa.Schema:
    """Schema of a data shard for a job recording the top ``k`` alternatives per token.

    ``logprob_dtype`` float16 halves the logprob columns (see bench/README.md for what it
    costs in precision); float32 is the default. ``topk_encoding`` "compact" stores the top-K
    as one ``top_k_compact`` binary column that harvest's readers decode."""
    schema = _record_schema(k, LOGPROB_TYPES[logprob_dtype])
    if topk_encoding == "float32":
        return schema
    if topk_encoding != "compact":
        raise ValueError(f"unknown top-K encoding {topk_encoding!r}")
    at = schema.get_field_index("top_token_ids")
    field = pa.field(TOPK_COMPACT_COLUMN, pa.binary(), nullable=False, metadata={b"k": b"%d" % k})
    return schema.remove(at + 1).remove(at).insert(at, field)


def _record_schema(k: int, lp: pa.DataType) -> pa.Schema:
    return pa.schema(
        [
            pa.field("request_id", pa.string(), nullable=False),
            pa.field("prompt_id", pa.string(), nullable=False),
            pa.field("sample_index", pa.int32(), nullable=False),
            pa.field("api", pa.string(), nullable=False),  # "completions" or "chat"
            pa.field("prompt", pa.string()),  # set for completions
            pa.field("messages", pa.list_(MESSAGE_TYPE)),  # set for chat
            pa.field("response", pa.string(), nullable=False),
            pa.field("finish_reason", pa.string()),
            pa.field("prompt_tokens", pa.int32()),
            pa.field("completion_tokens", pa.int32(), nullable=False),
            # The exact ids the teacher saw (chat template applied): prompt_token_ids + token_ids
            # is the sequence a student trains on, with no re-tokenisation.
            pa.field("prompt_token_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
            pa.field("logprobs", pa.list_(lp), nullable=False),
            pa.field("top_token_ids", pa.list_(pa.list_(pa.int32(), k)), nullable=False),
            pa.field("top_logprobs", pa.list_(pa.list_(lp, k)), nullable=False),
            # Score mode: which entries of token_ids to train on (the response / assistant
            # turns). Null in generate mode, where every entry of token_ids is trained on.
            pa.field("loss_mask", pa.list_(pa.bool_())),
            pa.field("teacher", pa.string(), nullable=False),
            pa.field("endpoint", pa.string()),
            pa.field("attempts", pa.int32(), nullable=False),
            pa.field("latency_ms", pa.float32()),
            # Score mode on rows that carry ids: the source's own logprob of each of token_ids
            # (the student's, in an on-policy round), beside the teacher's in ``logprobs``.
            pa.field("student_logprobs", pa.list_(lp)),
            # log(1 - sum(exp(top_logprobs))) per token, computed by the worker from the
            # server's full-precision values: exact even when the logprob columns are float16.
            # -inf where the top K hold all the mass (their sum rounds to 1 or more); 0 for K = 0.
            # Null in shards written before it existed (readers then recompute it).
            pa.field("tail_logprob", pa.list_(pa.float32())),
        ]
    )


FAILURE_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("source", pa.string()),  # file:line of the input row
        pa.field("prompt", pa.string()),
        pa.field("messages", pa.list_(MESSAGE_TYPE)),
        pa.field("raw", pa.string()),  # the input row as read, when it could not be parsed
        pa.field("error_class", pa.string(), nullable=False),
        pa.field("http_status", pa.int32()),
        pa.field("message", pa.string(), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
        pa.field("endpoint", pa.string()),
        pa.field("teacher", pa.string(), nullable=False),
    ]
)
