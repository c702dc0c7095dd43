"""``elastic run | validate | report``: the command line.

Bad input ends with one line on stderr naming the field or cause and exit code 2, never a traceback;
a job that fails while running ends with one line and exit code 1 (its checkpoint stays usable).
"""

from __future__ import annotations

import argparse
import logging
import os

import yaml
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


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
    run.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
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
    try:
        overrides = _overrides(args)
        errors = validate_job_spec(args.job, overrides)
    except ConfigError as exc:
        errors, overrides = exc.errors, None
    if not errors:
        from elastic.task import TaskError  # imports torch

        spec = load_job_spec(args.job, overrides)
        try:
            preflight(spec)
        except TaskError as exc:
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

    from elastic.task import TaskError  # imports torch

    try:
        preflight(spec)  # bad task or data: fail here, before any Ray cluster starts
        _check_run_dir(spec)
    except (ConfigError, TaskError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)

    # Imported only now: a bad spec fails without loading torch and Ray (about a second).
    from elastic.backends import BackendError
    from elastic.checkpoint import CheckpointError
    from elastic.group import WorkerGroupError
    from elastic.metrics import MetricsError
    from elastic.trainer import ElasticTrainer, TrainerError

    operator_client = None
    if os.environ.get("ELASTIC_JOB_RESOURCE"):  # a driver pod of the ElasticJob operator
        from controller.k8s.contract import ContractError, ElasticJobStatusClient

        try:
            operator_client = ElasticJobStatusClient.from_env()
        except ContractError as exc:
            return _fail(str(exc), EXIT_BAD_INPUT)
    trainer = ElasticTrainer(spec, resume=args.resume, ledger=args.ledger, show_progress=not args.quiet,
                             operator_client=operator_client)
    try:
        summary = trainer.run()
    except (MetricsError, CheckpointError, BackendError) as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    except (TrainerError, WorkerGroupError) as exc:
        return _fail(str(exc), EXIT_FAILED)
    except KeyboardInterrupt:
        return _fail("interrupted; resume with --resume", EXIT_FAILED)
    _print_summary(summary)
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from elastic.report import ReportError, draw_report

    try:
        out = draw_report(Path(args.run_dir), Path(args.out) if args.out else None)
    except ReportError as exc:
        return _fail(str(exc), EXIT_BAD_INPUT)
    print(out)
    return EXIT_OK


def _print_summary(summary) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in summary.evaluation.items())
    console.print(f"[bold]{summary.name}[/bold] finished: tau {summary.progress:.1f} / {summary.total_progress:g} "
                  f"in {summary.steps} steps ({summary.skipped_steps} skipped), {summary.samples} samples, "
                  f"{summary.elapsed_s:.1f} s; test {metrics}")
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
        console.print(f"[yellow]stopped early[/yellow] at tau {summary.progress:.1f}; continue with: "
                      f"elastic run JOB.yaml --resume")
    console.print(f"worker failures {summary.worker_failures}; final workers {summary.final_workers}; "
                  f"checkpoint step {summary.checkpoint_step}; run dir {summary.run_dir}")
    console.print(f"draw it: elastic report {summary.run_dir}")


if __name__ == "__main__":
    sys.exit(main())
