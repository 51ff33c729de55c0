"""`cxrlt` command line: one subcommand per entry of `COMMANDS`.

Adding a command = write `_<name>_arguments(parser)` and `_<name>(args) -> int`, and add one
`Command` to `COMMANDS`. Heavy modules are imported inside the run function, so parsing (and
`cxrlt --help`) never pulls in torch. Bad input (`DataError`) becomes one `error: ...` line on
stderr and exit code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cxrlt import __version__
from cxrlt.errors import DataError
from cxrlt.labels import TASKS


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names it in "invalid int value"
    return parse


_positive_int = _int_at_least(0)


def _score_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--labels", required=True, help="labels CSV, e.g. test_labeled_task1.csv")
    p.add_argument("--predictions", required=True, help="submission CSV (dicom_id + classes)")
    p.add_argument("--task", default="task1", choices=sorted(TASKS), help="default: task1")
    p.add_argument("--out", help="write the metrics as JSON here (atomically)")
    p.add_argument(
        "--train-labels",
        help="training CSV whose positive counts define head/medium/tail "
        "(default: the official CXR-LT 2024 training counts)",
    )
    p.add_argument(
        "--thresholds", help="JSON {class: threshold} tuned on validation, for mF1@tuned"
    )
    p.add_argument(
        "--bootstrap",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="study-level bootstrap replicates for the CIs; 0 skips them (default: 1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--ci", type=float, default=0.95, help="interval level (default: 0.95)")
    p.add_argument(
        "--ci-method",
        default="bca",
        choices=("bca", "percentile", "basic"),
        help="bootstrap interval method: bca (bias-corrected and accelerated), percentile or "
        "basic (default: bca)",
    )


def _score(args: argparse.Namespace) -> int:
    from cxrlt import scoring
    from cxrlt.io import write_json

    if not 0 < args.ci < 1:
        raise DataError(f"--ci must be between 0 and 1, got {args.ci}")
    result = scoring.score(
        args.labels,
        args.predictions,
        task=args.task,
        train_labels=args.train_labels,
        thresholds=args.thresholds,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        ci=args.ci,
        ci_method=args.ci_method,
    )
    print(scoring.format_report(result))
    if args.out:
        write_json(args.out, result)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "experiments",
        nargs="*",
        metavar="EXP",
        help="experiment names, branch names, commit prefixes or git revisions (HEAD, HEAD~2, a "
        "tag) of runs in `dvc exp show -A` (default: the baseline commit and all its "
        "experiments); `workspace` for unsaved work",
    )
    p.add_argument("--baseline", metavar="EXP", help="the A of B - A (default: the first run)")
    p.add_argument("--split", default="test", help="split to compare on (default: test)")
    p.add_argument(
        "--bootstrap",
        type=_positive_int,
        default=1000,
        metavar="N",
        help="paired study-bootstrap replicates; 0 skips the intervals (default: 1000)",
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--ci", type=float, default=0.95, help="interval level (default: 0.95)")
    p.add_argument(
        "--ci-method",
        default="percentile",
        choices=("percentile", "bca"),
        help="interval of the paired differences (default: percentile)",
    )
    p.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PARAM",
        help="a param not used to group runs (repeatable), e.g. one added to params.yaml "
        "after the older runs: --ignore train.compile",
    )
    p.add_argument(
        "--level",
        action="append",
        default=[],
        metavar="LEVEL",
        help="score every run at this prediction level (repeatable; image, mean, max, "
        "view_group, fused) instead of its submitted one: levels of the same models, paired "
        "seed by seed, the first level as A",
    )
    p.add_argument("--repo", default=".", help="DVC repository (default: .)")
    p.add_argument("--json", metavar="PATH", help="write the result as JSON here (atomically)")


def _compare(args: argparse.Namespace) -> int:
    from cxrlt import compare
    from cxrlt.io import write_json

    result = compare.compare(
        args.repo,
        args.experiments,
        baseline=args.baseline,
        split=args.split,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        ci=args.ci,
        method=args.ci_method,
        ignore=args.ignore,
        levels=args.level,
    )
    print(compare.format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="+", metavar="PATH",
                   help="JPEG, PNG or DICOM files, or folders (searched recursively)")  # fmt: skip
    p.add_argument("--model", required=True, help="checkpoint written by the train stage, e.g. models/stage1.pt")
    p.add_argument("--out", required=True, help="CSV to write (atomically): path, error, image:<class> ...")
    p.add_argument("--batch-size", type=_int_at_least(1), default=32, help="images per forward pass (default: 32)")
    p.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cpu, cuda, cuda:<n> or mps")
    p.add_argument("--workers", type=_positive_int, default=0,
                   help="processes decoding images while the model runs; 0: in this process (default: 0)")  # fmt: skip
    p.add_argument("--tta-hflip", action="store_true",
                   help="average with the mirrored image (as params predict.tta_hflip)")  # fmt: skip
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unreadable file instead of skipping it")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")


def _predict(args: argparse.Namespace) -> int:
    from cxrlt.predict_files import predict_files

    report = predict_files(
        args.model,
        args.paths,
        args.out,
        batch_size=args.batch_size,
        device=args.device,
        strict=args.strict,
        tta_hflip=args.tta_hflip,
        workers=args.workers,
        progress=not args.no_progress,
    )
    for path, reason in report.skipped.items():
        print(f"skipped {path}: {reason}", file=sys.stderr)
    print(f"predict on {report.device}: {report.scored} images scored, {len(report.skipped)} skipped "
          f"({len(report.classes)} classes) -> {report.out}")  # fmt: skip
    return 0 if report.scored else 1


COMMANDS: dict[str, Command] = {
    "score": Command(
        help="score a CXR-LT submission CSV against a labels CSV",
        add_arguments=_score_arguments,
        run=_score,
    ),
    "compare": Command(
        help="compare DVC experiments: mean ± SD over seeds, paired bootstrap differences",
        add_arguments=_compare_arguments,
        run=_compare,
    ),
    "predict": Command(
        help="score JPEG, PNG and DICOM files with a trained model, as the pipeline preprocesses them",
        add_arguments=_predict_arguments,
        run=_predict,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxrlt", description="Long-tailed multi-label chest X-ray classification (CXR-LT)."
    )
    parser.add_argument("--version", action="version", version=f"cxrlt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `cxrlt` script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
