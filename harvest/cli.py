"""``harvest``: run, validate and describe harvest jobs.

Exit codes: 0 done; 3 done, but some prompts ended in failure shards; 2 the job file or input
is unusable; 1 the job stopped early (teacher error, crash); 130 stopped by a signal. Errors
are one line, never a traceback: the message names the file, line or field at fault.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from harvest.driver import stopping
from harvest.driver.lease import OutputBusy
from harvest.driver.options import RunOptions
from harvest.driver.preflight import PreflightError
from harvest.inputs.sources import InputError
from harvest.jobfile import load_job
from harvest.outputs.manifest import ResumeRefused
from harvest.watch import logs
from schemas.job import JobSpec, SpecError
from workers.storage import StorageError, open_store

if TYPE_CHECKING:
    from harvest.driver.summary import Summary

EXIT_OK, EXIT_ABORTED, EXIT_BAD_JOB, EXIT_WITH_FAILURES, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


def cmd_validate(args: argparse.Namespace) -> int:
    from harvest.inputs.check import describe_input

    spec = load_job(args.job)
    # The spec holds no secret to redact: keys are read from the environment or a key file.
    print(json.dumps(spec.model_dump(mode="json"), indent=2))
    print(describe_input(spec))
    if args.check_teacher:
        from harvest.driver.preflight import check_teacher, read_api_key
        from harvest.driver.reach import check_listening

        if spec.teacher.replicas is not None:
            print("teacher: managed replicas start with the run; not checked here")
            return EXIT_OK
        check_listening(spec.teacher.endpoints)
        info = check_teacher(spec, read_api_key(spec), "validate")
        print(
            f"teacher: {spec.teacher.model} answers at {', '.join(spec.teacher.endpoints)} "
            f"(loaded from {info.identity().get('model_root')})"
        )
    return EXIT_OK


def cmd_retry_failed(args: argparse.Namespace) -> int:
    from harvest.driver.retry import retry_failed

    out_dir = args.output
    return _harvest(
        lambda: retry_failed(out_dir, options=_run_options(args)),
        out_dir,
        resume=f"harvest retry-failed {out_dir}",
    )


def cmd_provenance(args: argparse.Namespace) -> int:
    from harvest.outputs.provenance import report

    text, agreed = report(args.output)
    print(text)
    return EXIT_OK if agreed else EXIT_ABORTED


def cmd_inspect(args: argparse.Namespace) -> int:
    from harvest.training.inspection import report

    print(report(args.output, samples=args.samples, decode=not args.no_decode))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from harvest.outputs.export import ExportError, export_axolotl, load_tokenizer

    try:
        result = export_axolotl(args.output, args.dest, load_tokenizer(args.output, args.tokenizer))
    except ExportError as err:
        _error(str(err))
        return EXIT_BAD_JOB
    written = ", ".join(f"{n} {kind}" for kind, n in sorted(result.written.items())) or "none"
    print(
        f"exported {written} records to {args.dest} ({len(result.refused)} refused, "
        f"{result.cut_targets} targets cut at a re-tokenisation difference, "
        f"{result.filler_rows} untrained filler rows); axolotl datasets config: "
        f"{args.dest.rstrip('/')}/axolotl_datasets.yaml"
    )
    return EXIT_OK


def cmd_failures(args: argparse.Namespace) -> int:
    from harvest.training.failures import report

    print(report(args.output, examples=args.examples))
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    try:
        from harvest.report import write_report

        where = write_report(args.output, args.to)
    except ModuleNotFoundError as err:
        if err.name != "matplotlib":
            raise
        _error("harvest report needs matplotlib: pip install 'teacher-harvest[report]'")
        return EXIT_BAD_JOB
    print(f"report written to {where}")
    return EXIT_OK


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(JobSpec.model_json_schema(), indent=2))
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from harvest.driver.scheduler import run_job  # Ray loads only for the commands that use it

    spec = load_job(args.job)
    out_dir = args.output or spec.output.dir
    return _harvest(
        lambda: run_job(spec, out_dir, force_new=args.force_new, options=_run_options(args)),
        out_dir,
        resume=f"harvest run {args.job} --output {out_dir}",
    )


def _run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(
        ray_address=args.ray_address,
        show_progress=not args.no_progress,
        status_every_s=args.status_every,
        stop_deadline_s=args.stop_deadline,
    )


def _harvest(run: Callable[[], Summary], out_dir: str, resume: str) -> int:
    """Run a harvest, turn early stops into one-line errors, then report and pick the exit code."""
    from harvest.driver.scheduler import ClusterUnavailable, JobAborted, ReplicaError

    try:
        summary = run()
    except (JobAborted, ReplicaError) as err:
        _error(f"{err}. Committed shards are kept; rerun `{resume}` to continue.")
        return EXIT_ABORTED
    except ClusterUnavailable as err:
        _error(str(err))
        return EXIT_BAD_JOB
    return _finish(summary, out_dir, resume)


def _finish(summary: Summary, out_dir: str, resume: str) -> int:
    print(format_summary(summary))
    _write_summary(summary)
    if summary.interrupted:
        print(f"stopped early; resume with: {resume}")
        return EXIT_INTERRUPTED
    if summary.failure_rows:
        print(f"completed with failures: {summary.failure_rows} records in {out_dir}/failed/")
        return EXIT_WITH_FAILURES
    return EXIT_OK


def format_summary(s: Summary) -> str:
    """This run's work first (its rate is its own tokens over its own time), then the output
    as a whole, each labelled; failed prompts are never counted as harvested."""
    harvested = s.prompts_this_run - s.run_failed_prompts
    lines = [
        f"job {s.job_id}, this run ({s.elapsed_s:.1f}s): {harvested} harvested, "
        f"{s.run_failed_prompts} failed of {s.prompts_this_run} prompts sent",
        f"  data rows: {s.run_data_rows}   failure rows: {s.run_failure_rows}   "
        f"{_token_word(s)}: {s.run_tokens} ({s.tokens_per_s:,.0f} tok/s)",
        f"  retries: {s.retries}   worker restarts: {s.worker_restarts}   "
        f"replica restarts: {s.replica_restarts}",
    ]
    for endpoint, count in sorted(s.endpoint_requests.items()):
        lines.append(f"  prompts answered by {endpoint}: {count}")
    for cls, count in sorted(s.error_classes.items()):
        lines.append(f"  failed prompts, {cls}: {count}")
    for cls, count in sorted(s.not_retried.items()):
        lines.append(f"  not retried, {cls}: {count} (can never succeed as given; fix the input)")
    lines += [
        f"output as a whole: {s.prompts_done}/{s.prompts} prompts, data rows: {s.data_rows}   "
        f"failure rows: {s.failure_rows}   {_token_word(s)}: {s.completion_tokens}",
        f"  read it with harvest.open_dataset({s.out_dir!r}) (committed shards only); "
        f"look with `harvest inspect {s.out_dir}`, failures with `harvest failures {s.out_dir}`",
    ]
    return "\n".join(lines)


def _token_word(s: Summary) -> str:
    return "scored tokens" if s.mode == "score" else "completion tokens"


def _write_summary(s: Summary) -> None:
    open_store(s.out_dir).write_bytes("_summary.json", json.dumps(s.to_dict(), indent=2).encode())


def _error(message: str) -> None:
    print(f"harvest: error: {message}", file=sys.stderr)


def cmd_status(args: argparse.Namespace) -> int:
    from harvest.watch.status import read_status, render

    print(render(read_status(args.output)))
    return EXIT_OK


def _logging_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="what reaches stderr (the run log keeps info and above); debug also shows Ray's",
    )
    common.add_argument(
        "--log-format", default="text", choices=["text", "json"], help="stderr log lines"
    )
    common.add_argument(
        "--status-every",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how often the status file is rewritten, and the status line printed when stderr "
        "is not a terminal (default 5)",
    )
    common.add_argument(
        "--stop-deadline",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="on SIGINT/SIGTERM, how long the units in flight may take to finish before the "
        "driver stops its workers (default 60); the process ends within this plus 20 s",
    )
    return common


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harvest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    logging_opts = _logging_options()
    run = sub.add_parser(
        "run", help="harvest a job (resumes an existing output folder)", parents=[logging_opts]
    )
    run.add_argument("job", help="job file (YAML or JSON)")
    run.add_argument("--output", help="output folder or s3:// / gs:// URI (overrides output.dir)")
    run.add_argument("--force-new", action="store_true", help="discard a different job's output")
    run.add_argument(
        "--ray-address",
        help="Ray cluster to join (default: $RAY_ADDRESS or a private local cluster)",
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.set_defaults(func=cmd_run)
    val = sub.add_parser("validate", help="check a job file and its input, print the resolved spec")
    val.add_argument("job")
    val.add_argument(
        "--check-teacher",
        action="store_true",
        help="also reach every endpoint and check it serves the model (no harvest starts)",
    )
    val.set_defaults(func=cmd_validate)
    retry = sub.add_parser(
        "retry-failed",
        help="re-send the prompts in an output's failure shards",
        parents=[logging_opts],
    )
    retry.add_argument("output", help="output folder or URI of a harvest")
    retry.add_argument("--ray-address", help="Ray cluster to join")
    retry.add_argument("--no-progress", action="store_true", help="no progress bar")
    retry.set_defaults(func=cmd_retry_failed)
    prov = sub.add_parser("provenance", help="print an output's provenance; check shards agree")
    prov.add_argument("output", help="output folder or URI of a harvest")
    prov.set_defaults(func=cmd_provenance)
    stat = sub.add_parser("status", help="how a running or finished harvest stands")
    stat.add_argument("output", help="output folder or URI of a harvest")
    stat.set_defaults(func=cmd_status)
    ins = sub.add_parser("inspect", help="counts, histograms and sample records of an output")
    ins.add_argument("output", help="output folder of a harvest")
    ins.add_argument("--samples", type=int, default=3, help="records to show (default 3)")
    ins.add_argument("--no-decode", action="store_true", help="show stored text, not decoded ids")
    ins.set_defaults(func=cmd_inspect)
    exp = sub.add_parser("export", help="write an output as a trainer's dataset (axolotl KD)")
    exp.add_argument("output", help="output folder or URI of a harvest")
    exp.add_argument("dest", help="folder or URI to write the dataset to")
    exp.add_argument("--format", choices=["axolotl"], default="axolotl", help="dataset layout")
    exp.add_argument("--tokenizer", help="teacher tokenizer (default: shards' model_root)")
    exp.set_defaults(func=cmd_export)
    fails = sub.add_parser("failures", help="why prompts failed: classes, messages, sources")
    fails.add_argument("output", help="output folder or URI of a harvest")
    fails.add_argument("--examples", type=int, default=3, help="records per class (default 3)")
    fails.set_defaults(func=cmd_failures)
    rep = sub.add_parser("report", help="write one self-contained HTML page about an output")
    rep.add_argument("output", help="output folder or URI of a harvest")
    rep.add_argument("--to", help="file to write (default: OUT/report.html)")
    rep.set_defaults(func=cmd_report)
    sch = sub.add_parser("schema", help="print the job file's JSON Schema")
    sch.set_defaults(func=cmd_schema)
    return parser


def entry() -> None:
    """The ``harvest`` command: a stop's last-resort timer stays armed until the process ends
    (Ray's own shutdown at exit included)."""
    sys.exit(main(exiting=True))


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    try:
        return _main(argv)
    finally:
        if not exiting:  # called in-process: the caller goes on, the timer must not end it
            stopping.disarm()


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    try:
        return args.func(args)
    except (
        SpecError, InputError, ResumeRefused, PreflightError, FileNotFoundError, StorageError,
        OutputBusy,
    ) as err:  # fmt: skip
        _error(str(err))
        return EXIT_BAD_JOB
    except KeyboardInterrupt:
        _error("interrupted; rerun the same command to resume")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    entry()
