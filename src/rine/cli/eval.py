"""`rine eval`: metrics of one or more detectors over a benchmark's test sets.

Examples:
  rine eval --suite ufd20 --root data/test --out runs/ufd20
  rine eval --suite synthbuster --root data --out runs/sb --model rine-vitl14-ldm   # ten-crop
  rine eval --suite folder --root Chameleon/test --out runs/cham --perturb none,jpeg,blur
  rine eval --suite ufd20 --root data/test --out runs/cmp --model A/ --model B/   # one backbone pass
  rine eval --suite opensdi --hub nebula/OpenSDI_test --out runs/opensdi    # Parquet from the Hub
  rine eval --suite ufd20 --root data/test --out runs/st --stability   # flips under re-saves, abstention

Writes metrics.json, predictions.jsonl, table.md / table.csv (the paper's ACC / AP layout),
metrics.csv and PNG plots; several models or perturbations get one folder each plus
summary.md / summary.csv. --stability adds one run per everyday re-encoding (docs/stability.md)
and stability.md / stability.json: per set, how often each re-encoding flips a call, and the
selective-prediction table (coverage and accuracy when abstaining on the unstable images), at
0.5 and at the model's own threshold. Unreadable images are listed with their error in
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
    decode_options,
    error_message,
    fail,
    load_detector,
    plural,
    positive_int,
    report_skipped,
)

logger = logging.getLogger(__name__)

SUITES = ("ufd20", "synthbuster", "genimage", "folder", "manifest", "parquet", "opensdi", "commfor", "aigibench",
          "holmes", "chameleon")
PERTURB_CHOICES = ("none", "blur", "crop", "jpeg", "noise", "combined")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate on benchmark test sets: ACC, AP, AUC, ... per set, tables and plots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_options(p)
    add_model_options(p, repeatable=True)
    r = p.add_argument_group("robustness")
    r.add_argument("--perturb", action="append", default=None, metavar="KIND[,KIND]",
                   help=f"one or more of {', '.join(PERTURB_CHOICES)} (none = clean); repeatable. Default: none")
    r.add_argument("--stability", action="store_true",
                   help="also score every image re-encoded as jpeg90, jpeg70, fit1080 and webp80 (docs/stability.md; "
                        "about 5x the encoder's work) and report per set the share of calls each re-encoding flips "
                        "and the coverage / accuracy of abstaining on the images some re-encoding flips, at 0.5 "
                        "and at the model's own (calibrated) threshold: stability.md, stability.json")
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
                        "Default: none")
    o = p.add_argument_group("output and run")
    o.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must not be a file)")
    o.add_argument(
        "--threshold", type=float, default=None,
        help="decision threshold of ACC, a probability (default: the model's own: 0.5, the paper's, "
        "or the calibrated one of a model from rine calibrate)",
    )
    o.add_argument("--bootstrap", type=positive_int, default=None, metavar="N",
                   help="add 95%% bootstrap intervals of ACC, AP and AUC per set from N resamples "
                        "(e.g. 1000; seeded by --bootstrap-seed)")
    o.add_argument("--bootstrap-seed", type=int, default=0, help="seed of --bootstrap (default 0)")
    c = p.add_argument_group("calibration transfer (docs/calibration.md)")
    c.add_argument("--calibrate-on", metavar="SET|DIR|FILE",
                   help="fit a calibration on this test set of the layout (or on a folder / manifest of "
                        "other images) and report the other sets with it; the set used is left out of "
                        "the metrics. Choose the fit with the options below")
    from .fitting import add_fit_options

    add_fit_options(c, band=False)
    o.add_argument(
        "--features-cache",
        metavar="DIR",
        help="keep backbone taps here (tap stores, as rine extract writes) for later runs (default: no cache)",
    )
    o.add_argument("--cache-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of cached taps (default float32; float16 halves the disk, changes "
                        "scores by ~1e-3)")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument(
        "--batch-size", type=positive_int, default=None, help="images per encoder batch (default 16 on CPU, 64 on GPU)"
    )
    add_decoding_options(o)
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def add_data_options(p: argparse.ArgumentParser, required: bool = True) -> argparse._ArgumentGroup:
    """--suite/--root and the options of each layout (shared with rine calibrate); the group."""
    d = p.add_argument_group("data")
    d.add_argument("--suite", required=required, choices=SUITES, help="layout of --root")
    d.add_argument(
        "--root",
        metavar="DIR|FILE",
        help="data root (the manifest file for --suite manifest; for Parquet suites, or --hub)",
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
    from .hubdata import add_hub_options

    add_hub_options(p)
    return d


def read_data(args: argparse.Namespace):
    """(layout, options) from the data options (a folder, a manifest, Parquet or --hub);
    LayoutError or CLIError on a bad root."""
    from .hubdata import read_sets

    options: dict = {}
    if args.sets:
        options["sets"] = [s.strip() for s in args.sets.split(",") if s.strip()]
    if args.suite == "synthbuster" and args.real_dir:
        options["real_dir"] = args.real_dir
    if args.suite == "genimage":
        options["split"] = args.split
    if args.suite in ("folder", "aigibench", "holmes", "chameleon"):
        options.update(max_depth=args.max_depth, set_depth=args.set_depth)
    return read_sets(args, args.suite, options), options


def _conditions(args):
    from ..evaluation.results import Condition

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
    if getattr(args, "stability", False) and "none" not in kinds:
        kinds.insert(0, "none")  # the calls that re-encodings flip are the clean ones
    conditions = [
        Condition(None if k == "none" else k, args.seed, args.perturb_quirks, args.perturb_p)
        for k in kinds
    ]
    if getattr(args, "stability", False):
        from ..data.reencode import DEFAULT_CONDITIONS

        conditions += [Condition(reencode=name) for name in DEFAULT_CONDITIONS]
    return conditions


def _load_models(args):
    """(detector, [EvalHead]) for one or several --model / --head on one backbone."""
    from ..evaluation.results import EvalHead
    from ..model.checkpoints import CheckpointError, load_head, load_pretrained
    from ..model.pretrained import DEFAULT_MODEL, WeightsUnavailableError, resolve_model

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
                # the backbone is loaded already (the first model's, or --backbone)
                head, config = load_pretrained(resolve_model(src, args.model_revision, backbone_given=args.backbone))
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


def _suite_table(args, result, layout) -> None:
    """A named benchmark's headline table (OpenSDI leaderboard, balanced accuracy) and a
    warning where the counts differ from the benchmark's published ones."""
    from ..data.layouts import OPENSDI_LABELS, SUITES_INFO
    from ..evaluation.leaderboard import write_suite_table

    info = SUITES_INFO.get(args.suite)
    if info is None:
        return
    for s in layout.sets:
        expected = (info.counts or {}).get(s.name)
        if expected and (s.n_real, s.n_fake) != expected:
            logger.warning("%s: %d real / %d fake, the benchmark publishes %d / %d", s.name, s.n_real, s.n_fake,
                           *expected)
    path = write_suite_table([r for r in result.runs if r.condition.is_clean] or result.runs,
                             [s.name for s in layout.sets], info.table, args.out, OPENSDI_LABELS,
                             args.threshold if args.threshold is not None else 0.5)
    if path is not None:
        print(path.read_text(encoding="utf-8"), file=sys.stderr, end="")


def _with_calibration_set(sets: list, calibrate_on: str | None, fit_options: dict | None):
    """(sets to score, name of the set to fit on): a set of the layout, or a folder / manifest
    scored as one more set."""
    if calibrate_on is None:
        return list(sets), None
    names = [s.name for s in sets]
    if calibrate_on in names:
        if len(sets) < 2:
            raise CLIError(f"--calibrate-on {calibrate_on}: it is the only test set, so none is left to report on")
        return list(sets), calibrate_on
    if not Path(calibrate_on).expanduser().exists():
        raise CLIError(f"--calibrate-on {calibrate_on}: neither a test set of this layout ({', '.join(names)}) "
                       "nor an existing folder or manifest file")
    from .fitting import read_images_arg

    extra = read_images_arg(calibrate_on, "--calibrate-on")
    extra.name = "calibrate-on:" + extra.name
    return [*sets, extra], extra.name


def _transfer(result, fit_set: str, fit_options: dict, args: argparse.Namespace, fit_root: Path | None = None) -> None:
    """Fit a calibration per run on `fit_set`'s records, drop that set, and recompute the
    metrics of the others with it (`metrics["calibration"]` says what was fitted). A set
    from a folder or manifest outside the layout is fingerprinted by its paths relative to
    `fit_root`, as `rine calibrate --reals` fingerprints the same images."""
    import dataclasses

    import numpy as np

    from ..evaluation.calibration import apply_rule, fingerprint, fit_calibration, records_arrays
    from ..evaluation.results import metrics_of
    from ..evaluation.scoring import image_key
    from ..model.calibration import DecisionRule

    for run_ in result.runs:
        recs = run_.records.pop(fit_set)
        z, y = records_arrays(recs)
        if fit_root is not None:
            base = fit_root.parent if fit_root.is_file() else fit_root
            keys = [image_key(r["path"], base) for r in recs if r["error"] is None]
        else:
            keys = [r["key"] for r in recs if r["error"] is None]
        fitted_on = {"set": fit_set, "n": int(z.size), "n_real": int(np.sum(y == 0)), "n_fake": int(np.sum(y == 1)),
                     "fingerprint": fingerprint(keys)}
        labels = y if fit_options["labelled"] else None
        fit = fit_calibration(z, labels, fitted_on=fitted_on, **fit_options["fit"])
        cal = fit.config
        rule = DecisionRule(threshold=cal.threshold, calibration=cal, cut_logit=cal.threshold_logit)
        if args.threshold is not None:
            rule = dataclasses.replace(rule, threshold=args.threshold, cut_logit=_logit(args.threshold), overridden=True)
        apply_rule(run_.records, rule)
        missing = run_.metrics.get("missing_sets")
        run_.metrics = metrics_of(run_.records, rule.threshold, args.bootstrap or 0, args.bootstrap_seed, True, rule)
        run_.metrics["calibration"] = dataclasses.asdict(cal)
        if missing is not None:
            run_.metrics["missing_sets"] = missing
    result.sets = [s for s in result.sets if s != fit_set]


def _stability(result, heads, args: argparse.Namespace) -> None:
    """The stability tables of every head (`evaluation.stability`) into `result.stability` and
    the clean run's metrics. The model's own rule: the calibration `--calibrate-on` fitted on
    the clean run, else the head's (calibrated or not), `--threshold` replacing the cut."""
    import dataclasses

    from ..evaluation.engine import head_rule
    from ..evaluation.stability import result_stability
    from ..model.calibration import DecisionRule

    rules = {}
    for h in heads:
        clean = next(r for r in result.runs if r.head == h.name and r.condition.is_clean)
        fitted = clean.metrics.get("calibration")
        if fitted is None:
            rules[h.name] = head_rule(h, args.threshold)
            continue
        from ..config import CalibrationConfig

        cal = CalibrationConfig(**fitted)
        rule = DecisionRule(threshold=cal.threshold, calibration=cal, cut_logit=cal.threshold_logit)
        if args.threshold is not None:
            rule = dataclasses.replace(rule, threshold=args.threshold, cut_logit=_logit(args.threshold), overridden=True)
        rules[h.name] = rule
    result.stability = result_stability(result, rules)
    for r in result.runs:
        if r.condition.is_clean and r.head in result.stability:
            r.metrics["stability"] = result.stability[r.head]


def _logit(p: float) -> float:
    from ..model.calibration import logit_of

    return logit_of(p)


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
    from ..data.testsets import LayoutError
    from ..evaluation.engine import evaluate
    from ..evaluation.outputs import write_outputs
    from .fitting import fit_options_from_args

    if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:
        return fail(f"--threshold must be a probability within [0, 1], got {args.threshold}")
    try:
        fit_options = fit_options_from_args(args) if args.calibrate_on else None
        layout, options = read_data(args)
        sets, fit_set = _with_calibration_set(layout.sets, args.calibrate_on, fit_options)
    except (LayoutError, CLIError) as e:
        return fail(str(e))
    for s in sets:  # what the folder scans left out, per set (-v lists the files)
        report_skipped(s.skipped, logger, s.name)
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
            sets,
            heads=heads,
            conditions=conditions,
            root=root,
            batch_size=args.batch_size,
            progress=not args.no_progress and sys.stderr.isatty(),
            threshold=args.threshold,
            cache_dir=args.features_cache,
            cache_dtype=args.cache_dtype,
            decode=decode_options(args, detector),
            bootstrap=args.bootstrap or 0,
            bootstrap_seed=args.bootstrap_seed,
        )
        if fit_set is not None:
            fit_root = None if fit_set == args.calibrate_on else Path(args.calibrate_on).expanduser()
            _transfer(result, fit_set, fit_options, args, fit_root)
    except ValueError as e:  # CalibrationError included: it says what the data lacks
        return fail(str(e))
    from .. import __version__
    from ..model.checkpoints import head_digest

    result.meta = {
        "rine_version": __version__,
        "suite": args.suite,
        "root": str(layout.root),
        "layout_options": {k: v for k, v in options.items() if k != "columns"},
        "hub": {"dataset": args.hub, "revision": args.hub_revision} if args.hub else None,
        "missing_sets": layout.missing,
        "sets": {s.name: {"n_real": s.n_real, "n_fake": s.n_fake} for s in layout.sets},
        "backbone": detector.config.backbone,
        "backbone_revision": detector.config.backbone_revision,
        "preprocess": detector.config.to_dict()["preprocess"],
        "models": {h.name: (h.config.to_dict() if h.config else None) for h in heads},
        # which weights made the logits: rine calibrate --predictions checks its --model by it
        "head_digests": {h.name: head_digest(h.head) for h in heads},
        "conditions": [c.id for c in conditions],
        "perturb": {"seed": args.seed, "p": args.perturb_p, "quirks": args.perturb_quirks},
        "threshold": "each model's own" if args.threshold is None else args.threshold,
        "bootstrap": {"n": args.bootstrap, "seed": args.bootstrap_seed} if args.bootstrap else None,
        "calibrate_on": args.calibrate_on,
        "device": str(detector.device),
        "precision": args.precision,
        "backend": detector.backend.name,
    }
    for run_ in result.runs:
        run_.metrics["missing_sets"] = layout.missing
        for s in sets:
            if s.name in run_.metrics["sets"]:
                run_.metrics["sets"][s.name].update(n_skipped=s.skipped.total, skipped=s.skipped.counts())
    if args.stability:
        _stability(result, heads, args)
    write_outputs(result, args.out, plots=not args.no_plots)
    _suite_table(args, result, layout)
    if result.stability:
        from ..evaluation.stability import stability_markdown

        print(stability_markdown(result.stability), file=sys.stderr, end="")
    n_err = sum(run_.metrics["mean"]["n_errors"] for run_ in result.runs[:1])
    from ..metrics import mean_text

    for run_ in result.runs:
        m = run_.metrics["mean"]
        # Each mean says when it is over fewer sets than the run has (AP on one-class sets).
        print(f"{run_.name}: mean ACC {mean_text(m, 'acc')} / AP {mean_text(m, 'ap')}, "
              f"{plural(m['n_sets'], 'test set')}", file=sys.stderr)
    if n_err:
        print(
            f"rine: {plural(n_err, 'image')} could not be read (excluded; see error in predictions.jsonl)",
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
