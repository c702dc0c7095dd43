"""``elastic run | validate | report``: the command line.

Bad input ends with one line on stderr naming the field or cause and exit code 2, never a traceback;
a job that fails while running ends with one line and exit code 1 (its checkpoint stays usable).
A run stopped by SIGINT or SIGTERM checkpoints at the next step boundary, prints its summary marked
as stopped and exits 128 + the signal number (130, 143), as shells and Kubernetes expect.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal

import yaml
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def exit_code_for_signal(signum: int | None) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (SIGINT 130, SIGTERM 143)."""
    return EXIT_OK if signum is None else 128 + int(signum)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return args.handler(args)
    except Exception as exc:  # noqa: BLE001 - a bug, not bad input: still one line unless asked for more
        if getattr(args, "verbose", False):
            raise
        hint = "; rerun with --verbose for the traceback" if hasattr(args, "verbose") else ""
        return _fail(f"unexpected {type(exc).__name__}: {_first_line(exc)} (a bug in elastic{hint})", EXIT_FAILED)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elastic", description="Elastic-batch training on Ray with AdaScale SGD.")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run a job spec to its total progress, resizing in place")
    run.add_argument("job", help="job spec (YAML)")
    start = run.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in the run directory from its newest "
                       "valid checkpoint (a finished run is reported and left alone)")
    start.add_argument("--start-over", action="store_true",
                       help="move an earlier run in the run directory aside (to RUN_DIR.<run id>; nothing is "
                            "deleted) and start a new run")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a spec field, e.g. --set workers.max=8 (repeatable)")
    run.add_argument("--cluster-address", help="attach to an existing Ray cluster (sets cluster.backend=ray)")
    run.add_argument("--ledger", action="store_true", help="write ledger.jsonl: the samples of every step, per rank")
    run.add_argument("--quiet", action="store_true", help="no live progress line")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    run.set_defaults(handler=_cmd_run)

    validate = sub.add_parser("validate", help="check a job spec and list every error")
    validate.add_argument("job")
    validate.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(handler=_cmd_validate)

    report = sub.add_parser("report", help="draw a run's workers, scale, gain, lr, tau and loss (PNG)")
    report.add_argument("run_dir")
    report.add_argument("--out", help="PNG path (default RUN_DIR/report.png)")
    report.set_defaults(handler=_cmd_report)
    return parser


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _overrides(args: argparse.Namespace) -> dict:
    from elastic.config import parse_overrides

    overrides = parse_overrides(args.overrides)
    if getattr(args, "cluster_address", None):
        overrides["cluster.address"] = args.cluster_address
        if overrides.get("cluster.backend", _backend_in(args.job)) == "local":
            overrides["cluster.backend"] = "ray"  # attaching to a cluster replaces the embedded one
    return overrides


def _backend_in(job: str) -> str:
    """cluster.backend as written in the job file ("local" when absent or unreadable)."""
    try:
        cluster = yaml.safe_load(Path(job).read_text()).get("cluster") or {}
        return str(cluster.get("backend", "local"))
    except Exception:  # noqa: BLE001 - the real parse reports a broken file properly
        return "local"


def _field_in(job: str, overrides: dict, key: str):
    """A top-level field of the job file after overrides (None when absent or unreadable)."""
    if key in overrides:
        return overrides[key]
    try:
        return yaml.safe_load(Path(job).read_text()).get(key)
    except Exception:  # noqa: BLE001 - the real parse reports a broken file properly
        return None


def _cmd_validate(args: argparse.Namespace) -> int:
    from elastic.config import ConfigError, load_job_spec, validate_job_spec

    spec = None
    _add_task_paths(args.job)
    try:
        overrides = _overrides(args)
        errors = validate_job_spec(args.job, overrides)
    except ConfigError as exc:
        errors, overrides = exc.errors, None
    if not errors:
        from elastic.task import TaskError  # imports torch

        from controller.backends import BackendError, check_address

        spec = load_job_spec(args.job, overrides)
        try:
            check_address(spec.cluster.address)
            preflight(spec)
        except (TaskError, BackendError) as exc:
            errors = [str(exc)]
    elif overrides is not None and not any(e.startswith("task") for e in errors):
        task = _field_in(args.job, overrides, "task")
        if isinstance(task, str):  # the rest of the spec is wrong, but the task can be checked alone
            from elastic.task import TaskError, resolve_task

            try:
                resolve_task(task)
            except TaskError as exc:
                errors = [*errors, str(exc)]
    if errors:
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        print(f"{args.job}: {len(errors)} error(s)", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{args.job}: OK ({spec.name}: {spec.task}, workers {spec.workers.min}..{spec.workers.max}, "
          f"total_progress {spec.total_progress:g}, policy {spec.scaling.policy}, backend {spec.cluster.backend})")
    return EXIT_OK


def preflight(spec) -> None:
    """Checks what a bad task or data set would otherwise make fail on the workers, in about a second
    and before any cluster starts: the task imports and builds with ``task_args``, ``train_dataset()``
    returns a map-style dataset, and that dataset holds at least one global batch at ``workers.max``.

    The task is built once here in the driver and dropped again.

    Raises:
        TaskError: one line naming the task and the cause.
    """
    from elastic.task import TaskError, load_task

    task = load_task(spec.task, spec.task_args)
    try:
        dataset = task.train_dataset()
    except Exception as exc:  # noqa: BLE001 - any failure is the user's task failing
        raise TaskError(f"task: {spec.task}.train_dataset() raised {type(exc).__name__}: "
                        f"{_first_line(exc)}") from None
    try:
        size = len(dataset)
    except Exception as exc:  # noqa: BLE001 - an IterableDataset, None, or a broken __len__
        raise TaskError(f"task: {spec.task}.train_dataset() must return a map-style dataset with len() "
                        f"(got {type(dataset).__name__}: {type(exc).__name__}: {_first_line(exc)})") from None
    batch = spec.global_batch_size(spec.workers.max)
    if size < batch:
        raise TaskError(f"task: dataset has {size} samples, smaller than one global batch of {batch} "
                        f"at workers.max={spec.workers.max} (batch_size_per_worker={spec.batch_size_per_worker}, "
                        f"accumulation_steps={spec.accumulation_steps})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def _check_run_dir(spec) -> None:
    """The run directory can be created and written (the trainer writes its log there first)."""
    from elastic.config import ConfigError

    path = Path(spec.run_dir)
    probe = path / f".elastic-probe-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"run_dir: cannot write to {path}: {exc.strerror or exc}") from None


def _add_task_paths(job: str) -> None:
    """Makes a task module beside the job file, or in the current directory, importable here as
    ``python -m`` would (the ``elastic`` script's own directory is what Python puts first); the
    workers get the same directory through the job's runtime_env (controller.backends)."""
    for directory in (os.getcwd(), str(Path(job).resolve().parent)):
        if directory not in sys.path:
            sys.path.insert(0 if directory == os.getcwd() else len(sys.path), directory)


def _cmd_run(args: argparse.Namespace) -> int:
    from elastic.config import ConfigError, load_job_spec

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("ray", "filelock", "urllib3", "kubernetes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        spec = load_job_spec(args.job, _overrides(args))
    except ConfigError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    _add_task_paths(args.job)

    from controller.backends import BackendError, check_address
    from elastic.task import TaskError  # imports torch

    try:
        check_address(spec.cluster.address)
        preflight(spec)  # bad task or data: fail here, before any Ray cluster starts
        _check_run_dir(spec)
    except (ConfigError, TaskError, BackendError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)

    # Imported only now: a bad spec fails without loading torch and Ray (about a second).
    from elastic.checkpoint import CheckpointError
    from elastic.group import WorkerGroupError
    from elastic.metrics import MetricsError
    from elastic.rundir import RunDirError, RunFinished
    from elastic.trainer import TrainerError
    from elastic_app.wiring import make_trainer

    operator_client = None
    if os.environ.get("ELASTIC_JOB_RESOURCE"):  # a driver pod of the ElasticJob operator
        from controller.k8s.contract import ContractError, ElasticJobStatusClient

        try:
            operator_client = ElasticJobStatusClient.from_env()
        except ContractError as exc:
            return _fail(str(exc), EXIT_BAD_INPUT)
    trainer = make_trainer(spec, operator_client=operator_client, resume=args.resume, ledger=args.ledger,
                           show_progress=not args.quiet, start_over=args.start_over)
    try:
        summary = trainer.run()
    except RunFinished as done:
        print(done)
        return EXIT_OK
    except (MetricsError, CheckpointError, BackendError, RunDirError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except (TrainerError, WorkerGroupError) as exc:
        code = exit_code_for_signal(trainer._stop_signal) if trainer._stop_signal is not None else EXIT_FAILED
        return _fail(str(exc), code)
    except KeyboardInterrupt:  # a second signal: no checkpoint at this point
        signum = trainer._stop_signal or signal.SIGINT
        return _fail(f"aborted by a second {signal.Signals(signum).name}; the newest checkpoint stands: "
                     f"elastic run {args.job} --resume", exit_code_for_signal(signum))
    _print_summary(summary, args.job)
    return exit_code_for_signal(summary.stop_signal)


def _cmd_report(args: argparse.Namespace) -> int:
    from elastic.report import ReportError, draw_report

    try:
        out = draw_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except ReportError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    print(out)
    return EXIT_OK


def _print_summary(summary, job: str = "JOB.yaml") -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary.evaluation.items()) or "not evaluated"
    if summary.stop_signal is not None:
        outcome = f"[yellow]stopped by {signal.Signals(summary.stop_signal).name}[/yellow]"
    elif summary.stopped_early:
        outcome = "[yellow]stopped early[/yellow]"
    else:
        outcome = "finished"
    this_run = f"{summary.steps_this_run} steps, {summary.elapsed_s:.1f} s"
    if summary.resumed_from_step is not None:
        this_run = (f"{this_run} this run (resumed at step {summary.resumed_from_step}); "
                    f"{summary.steps} steps, {summary.total_elapsed_s:.1f} s in all")
    console.print(f"[bold]{summary.name}[/bold] {outcome}: tau {summary.progress:.1f} / {summary.total_progress:g}; "
                  f"{this_run} ({summary.skipped_steps} skipped), {summary.samples} samples; test {metrics}")
    if summary.resizes:
        table = Table(title="resizes (in place)")
        for column in ("tau", "workers", "direction", "cause", "pause s"):
            table.add_column(column, justify="right")
        for r in summary.resizes:
            table.add_row(f"{r.progress:.1f}", f"{r.from_workers} -> {r.to_workers}", r.direction, r.cause, f"{r.pause_s:.3f}")
        console.print(table)
    for missed in summary.extra.get("missed_schedule_steps", ()):
        when = f"tau {missed['at_progress']:g}" if missed["at_progress"] is not None else f"{missed['at_time_s']:g} s"
        console.print(f"[yellow]schedule step {missed['step']} ({missed['workers']} workers at {when}) never "
                      f"happened[/yellow]: {missed['reason']}")
    if summary.stopped_early:
        console.print(f"stopped at tau {summary.progress:.1f}; continue with: elastic run {job} --resume")
    console.print(f"run {summary.run_id}; worker failures {summary.worker_failures}; final workers "
                  f"{summary.final_workers}; checkpoint step {summary.checkpoint_step}; run dir {summary.run_dir}")
    if summary.metrics_url:
        console.print(f"metrics were at {summary.metrics_url}")
    console.print(f"draw it: elastic report {summary.run_dir}")


if __name__ == "__main__":
    sys.exit(main())
