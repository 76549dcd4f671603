"""`rine calibrate`: fit the decision rule of a model on your own images, with a guarantee.

Examples:
  # flag at most 5 % of authentic photos, with 95 % confidence (needs >= 59 real images)
  rine calibrate --reals my_photos/ --target-fpr 0.05 --out my-rine/
  # labelled real/fake folders: the best balanced-accuracy cut, or calibrated probabilities
  rine calibrate --suite folder --root labelled/ --objective balanced --out my-rine/
  rine calibrate --suite folder --root labelled/ --method platt --out my-rine/
  # unlabelled images of the target domain (about 30 % fakes expected)
  rine calibrate --unlabelled inbox/ --method prior-shift --fake-share 0.3 --out my-rine/
  # no second backbone pass: the predictions.jsonl of an earlier `rine eval` of this model
  rine calibrate --predictions runs/ufd20/predictions.jsonl --sets progan --objective f1 --out my-rine/

  rine detect --model my-rine/ photo.jpg      # calibrated probability, threshold and verdict

--out receives a checkpoint folder (the same head; config.json gains a `calibration` block:
method, parameters, cut, what it was fitted on, the achieved rates with their intervals)
and a report: calibration.md (printed), histograms.png, reliability.png (with labels).
See docs/calibration.md for which method to use and how many images each needs.

Exit status: 0 fitted, 2 bad usage, too few images for the asked guarantee, or a
calibration set without the classes the method needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from .common import (
    CLIError,
    add_decoding_options,
    add_model_options,
    check_output_dir,
    fail,
    positive_int,
    report_skipped,
)
from .fitting import add_fit_options, fit_options_from_args, read_images_arg

logger = logging.getLogger(__name__)

N_BOOT = 200  # refits for the stability line of the report and --uncertain-band auto


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit the decision threshold / calibrated probability on your own images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from .eval import add_data_options

    d = add_data_options(p, required=False)  # the other sources of images join its group
    d.add_argument("--reals", metavar="DIR|FILE",
                   help="authentic images only (a folder, searched recursively, or a manifest): enough "
                        "for --target-fpr")
    d.add_argument("--unlabelled", metavar="DIR|FILE",
                   help="images of the target domain without labels, for --method prior-shift")
    d.add_argument("--predictions", metavar="FILE",
                   help="the predictions.jsonl of a `rine eval` of this model: its logits are used and no "
                        "image is scored (choose sets with --sets); a --model whose head weights differ from "
                        "the ones the metrics.json beside it records is refused")
    add_model_options(p)
    f = p.add_argument_group("fit")
    add_fit_options(f)
    o = p.add_argument_group("output and run")
    o.add_argument("--out", required=True, metavar="DIR",
                   help="the calibrated checkpoint folder and its report (created)")
    o.add_argument("--features-cache", metavar="DIR",
                   help="keep / reuse backbone taps here (the stores of rine eval --features-cache)")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per encoder batch (default 16 on CPU, 64 on GPU)")
    add_decoding_options(o)
    o.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


# ---------------------------------------------------------------------------- data
def _run_of(file: Path) -> dict | None:
    """The metrics.json that rine eval wrote beside a predictions.jsonl (its run: the model's
    name and the meta with the data root and head digests); None where there is none."""
    try:
        data = json.loads(file.with_name("metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("meta"), dict) else None


def _key_base(run: dict | None) -> Path | None:
    """The folder that rine eval made image keys relative to (its data root), for records
    written before predictions.jsonl carried `key`; None: the paths as written."""
    meta = (run or {}).get("meta", {})
    root = meta.get("root")
    if not isinstance(root, str) or meta.get("hub") or meta.get("suite") in ("parquet", "opensdi", "commfor"):
        return None  # a Parquet record's key is not its path
    base = Path(root)
    return base.parent if base.is_file() else base


def _read_predictions(path: str, sets: list[str] | None, run: dict | None = None):
    """{set: [record]} from a rine eval predictions.jsonl (records with label and logit).
    Each record's `key` is the image's path relative to the data root, as when the images are
    scored from the folder (so both give one fingerprint): as written, or from `run`'s root."""
    from ..evaluation.scoring import image_key

    file = Path(path).expanduser()
    if not file.is_file():
        raise CLIError(f"--predictions {path}: no such file (the predictions.jsonl of a rine eval run)")
    base = _key_base(run)
    records: dict[str, list[dict]] = {}
    with file.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                r["label"], r["set"], r["error"] = int(r["label"]), str(r["set"]), r.get("error")
                r["logit"] = None if r.get("logit") is None else float(r["logit"])
            except (ValueError, KeyError, TypeError):
                raise CLIError(f"--predictions {path}, line {n}: not a rine eval record (path, set, label, logit)") from None
            if not r.get("key"):
                r["key"] = image_key(str(r.get("path", "")), base)
            if sets is None or r["set"] in sets:
                records.setdefault(r["set"], []).append(r)
    if not records:
        raise CLIError(f"--predictions {path}: no records" + (f" of the sets {', '.join(sets)}" if sets else ""))
    return records


def _check_model(path: str, run: dict | None, head, config, given: str) -> None:
    """CLIError when the rine eval run of `path` says another model made its logits: by the
    digest of the head's weights (rine eval writes it), else by the head's architecture."""
    from ..model.checkpoints import head_digest

    if run is None:
        print(f"rine: warning: --predictions {path}: no metrics.json beside it, so the model that made these "
              f"logits cannot be checked against --model {given}", file=sys.stderr)
        return
    name, meta = run.get("model"), run["meta"]
    recorded = (meta.get("head_digests") or {}).get(name)
    ours = head_digest(head)
    if recorded is not None:
        if recorded == ours:
            return
        found, wanted = f"head weights {recorded}", f"head weights {ours}"
    else:  # a run from before the digests: the architecture at least
        theirs = ((meta.get("models") or {}).get(name) or {}).get("head")
        mine = dataclasses.asdict(config.head)
        if not isinstance(theirs, dict) or all(theirs.get(k) == mine[k] for k in _SHAPE_KEYS):
            return
        found, wanted = f"a head {_head_text(theirs)}", f"a head {_head_text(mine)}"
    raise CLIError(f"--predictions: the logits in {path} were made by the model {name!r} ({found}, says the metrics.json beside "
                   f"it), but --model {given} has {wanted}: a cut fitted on another model's logits would be wrong "
                   f"for this one. Pass the model that rine eval scored, or score the images with this one "
                   "(--suite/--root, --reals)")


_SHAPE_KEYS = ("in_dim", "n_blocks", "nproj", "proj_dim", "use_tie", "blocks")  # dropout: not at inference


def _head_text(head: dict) -> str:
    return ", ".join(f"{k}={head.get(k)}" for k in _SHAPE_KEYS)


def _model_for_predictions(args):
    """(head, config) of --model / --head DIR without loading the backbone."""
    from ..model.checkpoints import CheckpointError, load_pretrained
    from ..model.pretrained import DEFAULT_MODEL, WeightsUnavailableError, resolve_pretrained

    source = args.head or args.model or DEFAULT_MODEL
    folder = Path(source).expanduser()
    try:
        if not folder.is_dir():
            if args.head:
                raise CLIError("--predictions with --head needs a checkpoint folder (config.json + model.safetensors)")
            folder = resolve_pretrained(source, backbone_given=args.backbone, check_backbone=False)
        return load_pretrained(folder)
    except WeightsUnavailableError as e:
        raise CLIError(str(e)) from None
    except (CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        raise CLIError(str(e)) from None


def _score(args, sets, root):
    """(head, config, {set: [record]}) scoring `sets` with the model options."""
    from ..evaluation.engine import evaluate
    from .common import decode_options, load_detector

    detector = load_detector(args, keep_reference=False)
    result = evaluate(
        detector, sets, root=root, batch_size=args.batch_size, decode=decode_options(args, detector),
        progress=not args.no_progress and sys.stderr.isatty(), cache_dir=args.features_cache,
    )
    return detector.model.head, detector.config, result.runs[0].records


def _sources(args) -> list[str]:
    given = [name for name, v in (("--suite/--root", args.suite or args.root), ("--reals", args.reals),
             ("--unlabelled", args.unlabelled), ("--predictions", args.predictions)) if v]
    if len(given) != 1:
        raise CLIError("give one source of images: --reals DIR, --suite S --root DIR, --unlabelled DIR or "
                       "--predictions FILE" + (f" (got {', '.join(given)})" if given else ""))
    if given[0] == "--suite/--root" and not (args.suite and args.root):
        raise CLIError("--suite and --root go together")
    return given


# ---------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from ..data.testsets import LayoutError

    try:
        out = check_output_dir(args.out)
        if args.features_cache:
            args.features_cache = str(check_output_dir(args.features_cache, "--features-cache"))
        source = _sources(args)[0]
        options = fit_options_from_args(args)
        band = _band_arg(args.uncertain_band)
    except CLIError as e:
        return fail(str(e))
    if args.decode_timeout < 0:
        return fail("--decode-timeout must be at least 0 (0: no limit)")
    if source == "--unlabelled" and args.method != "prior-shift":
        return fail("--unlabelled images go with --method prior-shift, which needs no labels (for a target "
                    "false-positive rate on authentic images, give them with --reals)")
    if source == "--reals" and args.method == "prior-shift":
        # prior-shift puts the cut at the balance point of a real/fake mix (half of the mass
        # above it by default): fitted on authentic images only, it would flag many of them.
        return fail("--method prior-shift fits a mix of real and fake images of the target domain; on --reals "
                    "(authentic images only) its cut would flag a large share of them. Give the mixed images "
                    "with --unlabelled, or keep --reals and bound the false positives with --target-fpr F")
    try:
        if source == "--predictions":
            sets = [s.strip() for s in args.sets.split(",")] if args.sets else None
            run_info = _run_of(Path(args.predictions).expanduser())
            records = _read_predictions(args.predictions, sets, run_info)
            head, config = _model_for_predictions(args)
            _check_model(args.predictions, run_info, head, config, args.head or args.model or config.name or "")
            where = str(Path(args.predictions).expanduser())
        else:
            if source == "--suite/--root":
                from .eval import read_data

                layout, _ = read_data(args)
                test_sets, root = layout.sets, (layout.root.parent if layout.root.is_file() else layout.root)
                where = str(layout.root)
            else:
                arg = args.reals or args.unlabelled
                ts = read_images_arg(arg, source, reals_only=source == "--reals")
                test_sets, where = [ts], str(Path(arg).expanduser())
                root = Path(arg).expanduser()
                root = root.parent if root.is_file() else root
            for ts in test_sets:  # what the folder scans left out (-v lists the files)
                report_skipped(ts.skipped, logger, ts.name)
            _check_enough(test_sets, options)  # before the backbone runs
            head, config, records = _score(args, test_sets, root)
    except LayoutError as e:
        return fail(str(e))
    except CLIError as e:
        return fail(str(e))
    except ValueError as e:
        return fail(str(e))
    return _fit_and_write(args, out, head, config, records, options, band, where, source)


def _band_arg(text: str | None) -> float | str | None:
    if text is None or text == "auto":
        return text
    try:
        w = float(text)
    except ValueError:
        raise CLIError(f"--uncertain-band {text!r}: a number (e.g. 0.1) or auto") from None
    if not 0.0 <= w < 0.5:
        raise CLIError(f"--uncertain-band must be within [0, 0.5), got {w}")
    return w


def _check_enough(test_sets, options: dict) -> None:
    """Refuse before scoring when the listed images cannot support the fit."""
    from ..evaluation.calibration import min_reals_for

    fit = options["fit"]
    n_real = sum(s.n_real for s in test_sets)
    n_fake = sum(s.n_fake for s in test_sets)
    if fit["target_fpr"] is not None and options["labelled"]:
        need = min_reals_for(fit["target_fpr"], fit["confidence"])
        if n_real < need:
            raise CLIError(f"--target-fpr {fit['target_fpr']:g} with {fit['confidence']:.0%} confidence needs at least "
                           f"{need} real images; the data lists {n_real}. Add {need - n_real} more, or ask for a "
                           "larger rate")
    two = fit["objective"] is not None or fit["method"] in ("temperature", "platt")
    if two and options["labelled"] and (n_real == 0 or n_fake == 0):
        what = f"--objective {fit['objective']}" if fit["objective"] else f"--method {fit['method']}"
        raise CLIError(f"{what} needs labelled real and fake images; the data lists {n_real} real and {n_fake} fake")


def _fit_and_write(args, out: Path, head, config, records, options, band, where: str, source: str) -> int:
    import numpy as np

    from ..evaluation.calibration import (
        CalibrationError,
        band_from_boundaries,
        bootstrap_boundaries,
        fingerprint,
        fit_calibration,
        records_arrays,
    )
    from ..evaluation.calibration_report import write_report
    from ..model.checkpoints import save_pretrained

    zs, ys, keys, n_errors = [], [], [], 0
    for recs in records.values():
        z, y = records_arrays(recs)
        zs.append(z)
        ys.append(y)
        keys += [str(r.get("key") or r.get("path")) for r in recs if r.get("error") is None and r.get("logit") is not None]
        n_errors += sum(1 for r in recs if r.get("error") is not None)
    z, y = np.concatenate(zs), np.concatenate(ys)
    labels = y if options["labelled"] else None
    fitted_on = {
        "source": source.lstrip("-"), "where": where, "sets": sorted(records), "n": int(z.size),
        "n_real": int(np.sum(y == 0)) if labels is not None else None,
        "n_fake": int(np.sum(y == 1)) if labels is not None else None,
        "n_errors": n_errors, "fingerprint": fingerprint(keys),
    }
    fit_kwargs = options["fit"]
    try:
        fit = fit_calibration(z, labels, fitted_on=fitted_on, **fit_kwargs)
        spread = bootstrap_boundaries(z, labels, n_boot=N_BOOT, seed=args.seed, **fit_kwargs)
    except CalibrationError as e:
        return fail(str(e))
    cal = fit.config
    if band == "auto":
        if spread.size < N_BOOT // 2:
            return fail(f"--uncertain-band auto: only {spread.size} of {N_BOOT} bootstrap refits succeeded; "
                        "give a width instead (e.g. --uncertain-band 0.1)")
        lo, hi = band_from_boundaries(cal, spread)
        cal = dataclasses.replace(cal, uncertain_low=lo, uncertain_high=hi)
    elif band:
        cal = dataclasses.replace(cal, uncertain_low=max(0.0, cal.threshold - band), uncertain_high=min(1.0, cal.threshold + band))
    fit.config = cal
    meta = dict(config.meta)
    meta["calibrated_from"] = args.head or args.model or config.name
    new = dataclasses.replace(config, calibration=cal, threshold=cal.threshold, meta=meta)
    save_pretrained(head, new, out)
    if n_errors:
        print(f"rine: {n_errors} images could not be read and were left out (see the report)", file=sys.stderr)
    text = write_report(out, fit, z, labels, config.name or "model", spread, plots=not args.no_plots)
    print(text)
    print(f"rine: calibrated checkpoint in {out}; use it with: rine detect --model {out} IMAGES", file=sys.stderr)
    return 0
