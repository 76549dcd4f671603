"""`rine eval`: metrics of one or more detectors over a benchmark's test sets.

Examples:
  rine eval --suite ufd20 --root data/test --out runs/ufd20
  rine eval --suite synthbuster --root data --out runs/sb --model rine-vitl14-ldm   # ten-crop
  rine eval --suite folder --root Chameleon/test --out runs/cham --perturb none,jpeg,blur
  rine eval --suite ufd20 --root data/test --out runs/cmp --model A/ --model B/   # one backbone pass

Writes metrics.json, predictions.jsonl, table.md / table.csv (the paper's ACC / AP layout),
metrics.csv and PNG plots; several models or perturbations get one folder each plus
summary.md / summary.csv. Unreadable images are listed with their error in
predictions.jsonl, left out of the metrics and counted (n_errors).

Exit status: 0 done (even with some unreadable images, which are reported), 1 no image
could be scored at all, 2 bad usage, layout errors or missing weights.
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
from pathlib import Path

from .common import (
    CLIError,
    add_decoding_options,
    add_model_options,
    check_output_dir,
    error_message,
    fail,
    load_detector,
    positive_int,
)

logger = logging.getLogger(__name__)

SUITES = ("ufd20", "synthbuster", "genimage", "folder", "manifest")
PERTURB_CHOICES = ("none", "blur", "crop", "jpeg", "noise", "combined")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate on benchmark test sets: ACC, AP, AUC, ... per set, tables and plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--suite", required=True, choices=SUITES, help="layout of --root")
    d.add_argument(
        "--root",
        required=True,
        metavar="DIR|FILE",
        help="data root (the manifest file for --suite manifest)",
    )
    d.add_argument("--sets", metavar="A,B", help="only these test sets (comma-separated; default: all)")
    d.add_argument(
        "--real-dir",
        metavar="DIR",
        help="synthbuster: folder of the real RAISE images (default: RAISEpng/ or real_RAISE_1k/ "
        "in --root or its parent)",
    )
    d.add_argument("--split", default="val", help="genimage: split folder to read (default val)")
    d.add_argument(
        "--max-depth",
        type=positive_int,
        default=6,
        help="folder: how deep to look for real/fake folders (default %(default)s)",
    )
    d.add_argument(
        "--set-depth",
        type=positive_int,
        default=1,
        help="folder: path parts below --root naming a set (default 1)",
    )
    add_model_options(p, repeatable=True)
    r = p.add_argument_group("robustness")
    r.add_argument("--perturb", action="append", default=None, metavar="KIND[,KIND]",
                   help=f"one or more of {', '.join(PERTURB_CHOICES)} (none = clean); repeatable. Default: none")  # fmt: skip
    r.add_argument("--seed", type=int, default=0, help="seed of the perturbations (default 0)")
    r.add_argument(
        "--perturb-p",
        type=float,
        default=0.5,
        help="probability that an image is perturbed (default %(default)s, the paper's)",
    )
    r.add_argument("--perturb-quirks", choices=("none", "reference"), default="none",
                   help="reference: reproduce the reference code's blur sigma 4, JPEG quality 95, transposed "
                        "crop size and resize of the perturbed half only (see docs/evaluation.md). "
                        "Default: none")  # fmt: skip
    o = p.add_argument_group("output and run")
    o.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must not be a file)")
    o.add_argument(
        "--threshold", type=float, default=0.5, help="decision threshold of ACC (default %(default)s, the paper's)"
    )
    o.add_argument(
        "--features-cache",
        metavar="DIR",
        help="keep backbone taps here (rine.features stores) for later runs (default: no cache)",
    )
    o.add_argument("--cache-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of cached taps (default float32; float16 halves the disk, changes "
                        "scores by ~1e-3)")  # fmt: skip
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument(
        "--batch-size", type=positive_int, default=None, help="images per encoder batch (default 16 on CPU, 64 on GPU)"
    )
    add_decoding_options(o)
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _conditions(args):
    from ..evaluation.engine import Condition

    kinds: list[str] = []
    for item in args.perturb or ["none"]:
        for k in item.split(","):
            k = k.strip()
            if k not in PERTURB_CHOICES:
                raise CLIError(f"--perturb {k!r}: choose from {', '.join(PERTURB_CHOICES)}")
            if k not in kinds:
                kinds.append(k)
    if not 0.0 <= args.perturb_p <= 1.0:
        raise CLIError("--perturb-p must be between 0 and 1")
    return [
        Condition(None if k == "none" else k, args.seed, args.perturb_quirks, args.perturb_p)
        for k in kinds
    ]


def _load_models(args):
    """(detector, [EvalHead]) for one or several --model / --head on one backbone."""
    from ..evaluation.engine import EvalHead
    from ..model.checkpoints import CheckpointError, load_head, load_pretrained
    from ..model.pretrained import DEFAULT_MODEL, WeightsUnavailableError, resolve_pretrained

    models, heads = args.model or [], args.head or []
    if models and heads:
        raise CLIError("give either --model or --backbone/--head, not both")
    first = copy.copy(args)
    first.model = models[0] if models else None
    first.head = heads[0] if heads else None
    detector = load_detector(first)
    names: list[str] = []

    def unique(name: str) -> str:
        base, i = name, 2
        while name in names:
            name, i = f"{base}-{i}", i + 1
        names.append(name)
        return name

    sources = models or heads or [DEFAULT_MODEL]
    out = [
        EvalHead(
            unique(_label(sources[0], detector.config.name)), detector.head, detector.config
        )
    ]
    for src in sources[1:]:
        try:
            if heads:
                head, config = load_head(src)
            else:
                folder = Path(src).expanduser()
                head, config = load_pretrained(
                    folder if folder.is_dir() else resolve_pretrained(src)
                )
                if not args.backbone and (config.backbone, config.backbone_revision) != (
                    detector.config.backbone,
                    detector.config.backbone_revision,
                ):
                    raise CLIError(
                        f"--model {src} uses backbone {config.backbone!r} but {sources[0]} uses "
                        f"{detector.config.backbone!r}: models compared in one run must share a backbone"
                    )
        except WeightsUnavailableError as e:
            raise CLIError(str(e)) from None
        except (CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
            raise CLIError(error_message(e)) from None
        if config is not None and not args.crop and config.preprocess != detector.config.preprocess:
            # All heads score the same taps: a head whose own protocol differs (e.g. the ldm
            # model's ten-crop) would silently be evaluated with another one.
            raise CLIError(
                f"{src} preprocesses with {config.preprocess} but {sources[0]} with "
                f"{detector.config.preprocess}; compare them in separate runs or choose one with --crop"
            )
        out.append(EvalHead(unique(_label(src, config.name if config else None)), head, config))
    return detector, out


def _label(source: str, config_name: str | None) -> str:
    path = Path(source)
    if path.exists():
        return path.stem if path.is_file() else path.name
    return config_name or source


def run(args: argparse.Namespace) -> int:
    # Output places first: a bad --out must not cost a full scoring run before it fails.
    try:
        args.out = str(check_output_dir(args.out))
        if args.features_cache:
            args.features_cache = str(check_output_dir(args.features_cache, "--features-cache"))
    except CLIError as e:
        return fail(str(e))
    if args.decode_timeout < 0:
        return fail("--decode-timeout must be at least 0 (0: no limit)")
    from ..data.layouts import LayoutError, read_layout
    from ..evaluation.engine import evaluate, write_outputs

    options: dict = {}
    if args.sets:
        options["sets"] = [s.strip() for s in args.sets.split(",") if s.strip()]
    if args.suite == "synthbuster" and args.real_dir:
        options["real_dir"] = args.real_dir
    if args.suite == "genimage":
        options["split"] = args.split
    if args.suite == "folder":
        options.update(max_depth=args.max_depth, set_depth=args.set_depth)
    try:
        layout = read_layout(args.suite, args.root, **options)
    except LayoutError as e:
        return fail(str(e))
    if args.suite == "synthbuster" and args.crop is None:
        args.crop = "ten"  # the paper's protocol for the large Synthbuster images
        logger.info("synthbuster: using ten-crop (pass --crop center to change)")
    try:
        conditions = _conditions(args)
        detector, heads = _load_models(args)
    except CLIError as e:
        return fail(str(e))
    sizes = ", ".join(f"{s.name} {s.n_real}/{s.n_fake}" for s in layout.sets)
    logger.info("%d test sets (real/fake): %s", len(layout.sets), sizes)
    root = layout.root.parent if layout.root.is_file() else layout.root
    try:
        result = evaluate(
            detector,
            layout.sets,
            heads=heads,
            conditions=conditions,
            root=root,
            batch_size=args.batch_size,
            num_workers=args.workers,
            progress=not args.no_progress and sys.stderr.isatty(),
            threshold=args.threshold,
            cache_dir=args.features_cache,
            cache_dtype=args.cache_dtype,
            decoder=args.decoder,
            decode_timeout=args.decode_timeout or None,
        )
    except ValueError as e:
        return fail(str(e))
    from .. import __version__

    result.meta = {
        "rine_version": __version__,
        "suite": args.suite,
        "root": str(layout.root),
        "layout_options": options,
        "missing_sets": layout.missing,
        "sets": {s.name: {"n_real": s.n_real, "n_fake": s.n_fake} for s in layout.sets},
        "backbone": detector.config.backbone,
        "backbone_revision": detector.config.backbone_revision,
        "preprocess": detector.config.to_dict()["preprocess"],
        "models": {h.name: (h.config.to_dict() if h.config else None) for h in heads},
        "conditions": [c.id for c in conditions],
        "perturb": {"seed": args.seed, "p": args.perturb_p, "quirks": args.perturb_quirks},
        "threshold": args.threshold,
        "device": str(detector.device),
        "precision": args.precision,
        "backend": detector.backend.name,
    }
    for run_ in result.runs:
        run_.metrics["missing_sets"] = layout.missing
    write_outputs(result, args.out, plots=not args.no_plots)
    n_err = sum(run_.metrics["mean"]["n_errors"] for run_ in result.runs[:1])
    for run_ in result.runs:
        m = run_.metrics["mean"]
        acc = "-" if m["acc"] is None else f"{100 * m['acc']:.1f}"
        ap = "-" if m["ap"] is None else f"{100 * m['ap']:.1f}"
        print(f"{run_.name}: mean ACC {acc} / AP {ap} over {m['n_sets']} sets", file=sys.stderr)
    if n_err:
        print(
            f"rine: {n_err} images could not be read (excluded; see error in predictions.jsonl)",
            file=sys.stderr,
        )
    if layout.missing:
        print(
            f"rine: test sets not found and skipped: {', '.join(layout.missing)}", file=sys.stderr
        )
    print(f"rine: results in {args.out}", file=sys.stderr)
    if result.runs and result.runs[0].metrics["mean"]["n"] == 0:
        print("rine: error: no image could be scored: the metrics are empty", file=sys.stderr)
        return 1
    return 0
