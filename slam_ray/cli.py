"""`slam-ray`: one verb per stage, `run` for a whole experiment, `config` and `compare` around them.

Bad input or a bad config prints one paragraph and exits with code 2 (no traceback; `--debug` shows it).
A stage that ends `partial` (an eval task failed; every other task finished) exits with code 1 once the
command has done everything else it can; running it again retries only what failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from slam_ray.config import STAGES, load_experiment, to_yaml
from slam_ray.errors import SlamError

EXIT_USAGE = 2
EXIT_PARTIAL = 1
EXIT_CRASH = 3  # anything else that went wrong (Python's own exit code 1 would read as a partial result)


def _report_partial(partial: dict[str, dict[str, str]]) -> int:
    """Exit code for stages that ended `partial` (stage -> failed part -> reason), each said on stderr."""
    for stage, failed in partial.items():
        for part, reason in failed.items():
            print(f"slam-ray: {stage}: {part} failed: {reason}", file=sys.stderr)
        print(f"slam-ray: {stage} is partial ({len(failed)} failed); run the same command again to retry only "
              "those", file=sys.stderr)
    return EXIT_PARTIAL if partial else 0


def _cmd_run(args: argparse.Namespace) -> int:
    from slam_ray.pipeline import run_experiment

    _, partial = run_experiment(load_experiment(args.experiment, args.set))
    return _report_partial(partial)


def _cmd_stage(args: argparse.Namespace) -> int:
    from slam_ray.pipeline import stage_function

    exp = load_experiment(args.experiment, args.set)
    out = stage_function(args.command)(exp)
    print(f"{args.command} output: {out.path}")
    failed = out.failed_parts()
    return _report_partial({args.command: failed} if failed else {})


def _cmd_config(args: argparse.Namespace) -> None:
    exp = load_experiment(args.experiment, args.set)
    if args.action == "show":
        print(to_yaml(exp), end="")
    else:
        print(f"{args.experiment}: valid ({len(exp.stages)} stages: {', '.join(exp.stages)})")


def _cmd_export(args: argparse.Namespace) -> None:
    from slam_ray.parallel.audio_units import export_preference_units
    from slam_ray.stages.extract import export_slamkit

    exp = load_experiment(args.experiment, args.set)
    if args.format == "preferences":
        n = export_preference_units(exp, args.out)
    else:
        n = export_slamkit(exp, args.format, args.out)
    print(f"wrote {n} rows of slamkit {args.format} JSONL to {args.out}")


def _cmd_sweep(args: argparse.Namespace) -> None:
    from slam_ray.sweeps.search_space import load_space

    space = load_space(args.space)
    # Precedence: the experiment file < the space's `sweep:` block < --set.
    exp = load_experiment(args.experiment, space.overrides() + args.set)
    if args.dry_run:
        from slam_ray.sweeps.search_space import validate_space
        from slam_ray.sweeps.sweep import sweep_name

        validate_space(space, exp)
        print(f"{sweep_name(exp, space)}: valid ({len(space.params)} swept fields: {', '.join(space.params)}; "
              f"search {exp.sweep.search}, scheduler {exp.sweep.scheduler})")
        return
    from slam_ray.sweeps.sweep import sweep

    sweep(exp, space)


def _cmd_compare(args: argparse.Namespace) -> None:
    from slam_ray.sweeps.compare import compare

    mode = args.mode or ("min" if "loss" in args.metric else "max")
    compare(experiments=args.experiment, tracking_uri=args.tracking_uri, metric=args.metric, out_dir=args.out,
            sweep=args.sweep, mode=mode)


def _cmd_scaling(args: argparse.Namespace) -> None:
    from slam_ray.sweeps import scaling

    if args.action == "plan":
        p = scaling.plan_budget(args.flops, args.gpu, args.hours, args.mfu)
        print(json.dumps(p) if args.json else scaling.describe_plan(p))
    elif args.action == "plot":
        scaling.view(args.experiment, args.tracking_uri, args.out, args.sweep)
    else:
        s = scaling.fit_runs(args.experiment, args.tracking_uri, args.sweep, args.out, args.bootstrap)
        print(json.dumps(s) if args.json else scaling.describe_fit(s))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slam-ray", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_experiment(p: argparse.ArgumentParser) -> None:
        p.add_argument("experiment", metavar="EXPERIMENT", help="experiment YAML path or recipe name (e.g. quickstart)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set train.max_steps=100 (repeatable)")

    p = sub.add_parser("run", help="run the stages the experiment lists, in order")
    with_experiment(p)
    p.set_defaults(func=_cmd_run)
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage")
        with_experiment(p)
        p.set_defaults(func=_cmd_stage)
    p = sub.add_parser("export", help="write the extract stage's units as slamkit features or tokens JSONL, or "
                                      "synth's spoken preference triples with their units (for dpo.inputs)")
    with_experiment(p)
    p.add_argument("--format", choices=["features", "tokens", "preferences"], default="features")
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.set_defaults(func=_cmd_export)
    p = sub.add_parser("sweep", help="run an ablation: the experiment over a search space, with Ray Tune")
    with_experiment(p)
    p.add_argument("--space", required=True, help="search space YAML, or the name of one in search_spaces/")
    p.add_argument("--dry-run", action="store_true", help="validate the space against the experiment, run nothing")
    p.set_defaults(func=_cmd_sweep)
    p = sub.add_parser("compare", help="ablation table and plots from MLflow")
    p.add_argument("--experiment", action="append", help="MLflow experiment name (repeatable; default: all)")
    p.add_argument("--sweep", help="only the trials of this sweep (name, space name for the latest, or run id)")
    p.add_argument("--tracking-uri", help="MLflow URI (default: sqlite store of ./slam_runs/EXPERIMENT)")
    p.add_argument("--metric", default="eval/word_order/accuracy", help="metric to sort by")
    p.add_argument("--mode", choices=["max", "min"], help="best is max or min (default: min for losses)")
    p.add_argument("--out", help="folder for compare.csv and compare.png")
    p.set_defaults(func=_cmd_compare)
    p = sub.add_parser("scaling", help="scaling laws: plan a compute budget, place runs against Cuervo & Marxer's "
                                       "law, fit your own (docs/scaling.md)")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = actions.add_parser("plan", help="compute-optimal parameters and tokens, predicted loss and accuracies")
    q.add_argument("--flops", type=float, help="training compute in FLOPs (6 N D)")
    q.add_argument("--gpu", help="or: a GPU name (H100, A5000, ...) ...")
    q.add_argument("--hours", type=float, help="... for this many hours ...")
    q.add_argument("--mfu", type=float, default=0.4, help="... at this model FLOPs utilisation (default 0.4)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=_cmd_scaling)
    for action, text in (("plot", "runs from MLflow against the law's compute-optimal frontier (PNG + CSV)"),
                         ("fit", "fit the law's coefficients to runs' final validation losses")):
        q = actions.add_parser(action, help=text)
        q.add_argument("--experiment", action="append", help="MLflow experiment name (repeatable; default: all)")
        q.add_argument("--sweep", help="only the trials of this sweep (name, space name for the latest, or run id)")
        q.add_argument("--tracking-uri", help="MLflow URI (default: sqlite store of ./slam_runs/EXPERIMENT)")
        q.add_argument("--out", required=action == "plot", help="folder for the CSV and PNG")
        if action == "fit":
            q.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals")
            q.add_argument("--json", action="store_true", help="print one JSON object")
        q.set_defaults(func=_cmd_scaling)
    p = sub.add_parser("config", help="show or validate an experiment file")
    p.add_argument("action", choices=["show", "validate"])
    with_experiment(p)
    p.set_defaults(func=_cmd_config)
    return parser


def _ray_connected() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _shutdown_ray() -> None:
    """Disconnect from Ray (stopping a local instance) inside the terminal filter: the workers' last forwarded log
    lines arrive while it shuts down, and at interpreter exit they would reach the terminal unfiltered."""
    if _ray_connected():
        sys.modules["ray"].shutdown()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from slam_ray.core.fingerprint import snapshot
        from slam_ray.core.terminal import quiet_ray_noise

        connected = _ray_connected()  # main() called in a process already on Ray leaves that connection alone
        with quiet_ray_noise(), snapshot():  # each input given by path is fingerprinted once per command
            code = args.func(args) or 0  # commands with no failure of their own return None
            if not connected:
                _shutdown_ray()
    except SlamError as e:
        if args.debug:
            traceback.print_exc()
        print(f"slam-ray: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("slam-ray: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:
        traceback.print_exc()
        print(f"slam-ray: crashed ({type(e).__name__}: {e}); exit code {EXIT_CRASH}, not a partial result: "
              "finished stages are kept, so the same command resumes once the cause is fixed", file=sys.stderr)
        return EXIT_CRASH
    return code


if __name__ == "__main__":
    sys.exit(main())
