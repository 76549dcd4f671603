"""`rine batch`: score (or extract the taps of) many images on Ray Data, exactly once.

Examples:
  rine batch photos/ --out scores/                         # a local Ray sized to this machine
  rine batch uploads.parquet --out s3-day/ --address auto  # on the running cluster (ray start / KubeRay)
  rine batch 's3://bucket/day/list.csv' --out day/ --device cuda --num-gpus 4
  rine batch train.csv --taps --backbone ViT-L/14 --transform train --out feats/train

INPUT: image files, folders (recursive), globs, or manifests (.csv, .jsonl, .parquet) with a
`path` column and optional `label` and `set` columns; paths and manifests may be URIs that
pyarrow reads (s3://, gs://, file://). Images are read by the workers, not by this process.

Output: OUT/part-NNNNNN.parquet (columns path, prob_fake, logit, is_fake, error, the
provenance columns, [label, set], item) and OUT/_manifest.json (the model, its config, the
settings and the counts). Records equal `rine detect`'s for the same files: `provenance` is
the JSON of its record's provenance object, with the flat provenance_* columns and the
combined decision, decision_basis of its CSV (--no-provenance leaves them out). With --taps, OUT is a feature store that `rine train
--features` and `rine grid` read, shard for shard what `rine extract` writes.

Interrupted (Ctrl-C, kill -9, a lost cluster)? Run the same command again: finished shards
are kept, the rest is redone, and no input gets two records. Exit status: 0 every input
scored, 1 some inputs are error records, 2 the job could not finish (rerun it) or bad usage.
"""

from __future__ import annotations

import argparse
import sys

from ..data.images import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from ..errors import OptionError
from .common import (
    CLIError,
    add_model_options,
    byte_size,
    check_output_dir,
    cli_error,
    fail,
    pixel_count,
    positive_int,
)
from .provenance import add_trust_option, resolve_trust


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("batch", help="score or extract many images on Ray (local or a cluster), resumable",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs or manifests (.csv/.jsonl/.parquet "
                   "with a path column), local or URIs")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; the same command resumes the job in it)")
    add_model_options(p, batch_jobs=False)
    e = p.add_argument_group("engine")
    e.add_argument("--address", default="local", help="local (default): start a Ray of this machine; auto: the cluster "
                   "this machine belongs to (`ray start`), or HOST:6379 from a node of it. Not ray:// (Ray Data does not run "
                   "through Ray Client): from elsewhere, `ray job submit -- rine batch ... --address auto`")
    e.add_argument("--num-gpus", type=positive_int, default=None, help="GPUs to use, one scoring actor each "
                   "(default: every GPU of the cluster with --device auto/cuda)")
    e.add_argument("--actors", type=positive_int, default=None, help="scoring actors (default: one per GPU, else 1)")
    e.add_argument("--actor-cpus", type=positive_int, default=None, help="CPUs (torch threads) per scoring actor "
                   "(default: half the CPUs without a GPU, 1 with one)")
    e.add_argument("--batch-size", type=positive_int, default=None, help="images per scoring batch (default 16 on CPU, 64 on GPU)")
    e.add_argument("--decode-batch", type=positive_int, default=32, help="images per decoding task (default 32)")
    e.add_argument("--decode-tasks", type=positive_int, default=None, metavar="N",
                   help="decoding tasks running at once (default: with a local Ray, the cores the scoring actors "
                   "leave, at least 2; on a cluster, as many as its CPUs allow)")
    e.add_argument("--buffer-mb", type=float, default=None, metavar="MB",
                   help="object store memory the decoded images may hold at once; decoding waits beyond it, so "
                   "memory does not grow with the input list (default: two blocks per decoding slot and four "
                   "batches per actor, at least 128)")
    e.add_argument("--shard-size", type=positive_int, default=None, help="inputs per committed output file "
                   "(default 4096; with --taps 1024, as rine extract)")
    e.add_argument("--decode-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="an image still decoding after this long becomes an error record (default 300; 0: no limit)")
    e.add_argument("--max-pixels", type=pixel_count, default=DEFAULT_MAX_PIXELS,
                   help=f"refuse images with more pixels (default {DEFAULT_MAX_PIXELS // 10**6}M)")
    e.add_argument("--max-bytes", type=byte_size, default=DEFAULT_MAX_BYTES, metavar="SIZE",
                   help=f"refuse larger files (default {DEFAULT_MAX_BYTES // 2**20}M)")
    e.add_argument("--temp-dir", default=None, metavar="DIR", help="session folder of the local Ray (default Ray's, /tmp/ray)")
    e.add_argument("--stall-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="fail the job if it makes no progress this long (default 600; a lost node that "
                        "leaves the plan unschedulable stops it at once)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--stability", action="store_true",
                   help="also score each image re-encoded as jpeg90, jpeg70, fit1080 and webp80 (docs/stability.md; "
                        "about 5x the encoder's work, re-encoding in the decoding tasks): records gain threshold, "
                        "verdict (uncertain when a re-encoding flips the call), stability_spread, stability_flips, "
                        "stability_reason and one probability per re-encoding. A job keeps the choice it started with")
    p.add_argument("--no-provenance", action="store_true", help="leave out what each file declares about its origin "
                   "(the provenance, provenance_* and decision columns; docs/provenance.md). A job keeps the choice it "
                   "started with")
    add_trust_option(p)
    t = p.add_argument_group("taps (instead of scores: a feature store for rine train / rine grid)")
    t.add_argument("--taps", action="store_true", help="store the per-block taps of --backbone, as rine extract does")
    t.add_argument("--transform", choices=("train", "center", "ten"), default="center",
                   help="train: the reference's augmentation (seeded); center (default); ten: ten crops")
    t.add_argument("--views", type=positive_int, default=1, help="augmented views per image with --transform train (default 1)")
    t.add_argument("--seed", type=int, default=0, help="augmentation seed (default 0)")
    t.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="stored precision (default float16)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..cluster import INSTALL_HINT, ray_available

    if not ray_available():
        return fail(INSTALL_HINT)
    from ..cluster.batch import run_batch
    from ..cluster.job import BatchConfig, BatchError

    try:
        out = check_output_dir(args.out)
    except CLIError as e:
        return fail(str(e))
    if args.buffer_mb is not None and args.buffer_mb <= 0:
        return fail("--buffer-mb must be above 0")
    if args.decode_timeout < 0:
        return fail("--decode-timeout must be at least 0 (0: no limit)")
    precision = args.precision
    if args.taps and precision == "auto":
        precision = "fp32"  # rine extract's default
    if args.stability and args.taps:
        return fail("--stability scores images; --taps stores taps: choose one")
    if not args.no_provenance and not args.taps:
        try:
            resolve_trust(args)  # here, to name the file before Ray starts
        except ValueError as e:
            return fail(f"{e} (--trust-anchors or $RINE_TRUST_ANCHORS)")
    cfg = BatchConfig(
        inputs=list(args.inputs), out=str(out), model=args.model, backbone=args.backbone, revision=args.revision,
        head=args.head, crop=args.crop, device=args.device, precision=precision, stability=args.stability, taps=args.taps,
        provenance=not args.no_provenance, trust_anchors=args.trust_anchors,
        transform=args.transform, views=args.views, seed=args.seed, dtype=args.dtype, address=args.address,
        num_gpus=args.num_gpus, actors=args.actors, actor_cpus=args.actor_cpus, batch_size=args.batch_size,
        decode_batch=args.decode_batch, buffer_mb=args.buffer_mb, decode_tasks=args.decode_tasks, shard_size=args.shard_size, max_pixels=args.max_pixels,
        max_bytes=args.max_bytes, decode_timeout=args.decode_timeout or None, temp_dir=args.temp_dir,
        stall_timeout=args.stall_timeout, progress=not args.no_progress and sys.stderr.isatty(),
        ray_logs=args.verbose > 0,
    )
    try:
        result = run_batch(cfg)
    except OptionError as e:  # settings that do not fit, named by the library's parameters: the flags here
        return fail(str(cli_error(e)))
    except BatchError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        print(f"rine: interrupted; the finished shards are kept in {out}: run the same command to do the rest",
              file=sys.stderr)
        raise
    rec = result.reconciliation
    what = "stored" if args.taps else "scored"
    print(f"rine batch: {rec.n_inputs} inputs: {rec.scored} {what}, {rec.errors} errors"
          f"{f', {len(rec.missing)} missing' if rec.missing else ''}; this run {result.written} records in "
          f"{result.seconds:.1f} s ({result.images_per_s:.1f} images/s); {out}", file=sys.stderr)
    if result.skipped_shards:
        print(f"rine batch: {result.skipped_shards} shards were finished by an earlier run (kept)", file=sys.stderr)
    if result.error:
        print(f"rine: error: the job could not finish: {result.error}. The finished shards are kept: run the same "
              "command again to do the rest", file=sys.stderr)
    elif not rec.complete:
        print(f"rine: error: the output does not match the input list: {rec.problems()}", file=sys.stderr)
    return result.exit_code
