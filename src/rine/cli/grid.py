"""`rine grid`: sweep head hyper-parameters on stored taps, rank runs by mean ACC + mean AP.

Examples:
  rine grid --features feats/train --test-features feats/test --out grid/   # the paper's 48 runs
  rine grid --features feats/train --test-features feats/t1 feats/t2 --factors 0.2 --nproj 2,4 --proj-dims 128 --out g/

Writes OUT/grid.csv and OUT/grid.json (ranked), OUT/grid_log.jsonl (one line per run, as
they finish) and OUT/best/ (the best run's checkpoint, loadable by `rine detect --model`).
The paper picked hyper-parameters by test-set scores, as this does; pass held-out stores
as --test-features to avoid that bias.
"""

from __future__ import annotations

import argparse
import sys

from .common import CLIError, check_output_dir, fail
from .train import add_train_options, number_list, train_config_from_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grid", help="grid search of head hyper-parameters on stored taps", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--features", required=True, metavar="STORE", help="training store")
    p.add_argument("--test-features", required=True, nargs="+", metavar="STORE", help="test stores (each may hold several sets)")
    p.add_argument("--val-features", metavar="STORE", help="validation store (best epoch per run; default: none)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created; must not be a file)")
    g = p.add_argument_group("grid (default: the paper's 48 runs)")
    g.add_argument("--factors", metavar="F,F", type=number_list(float, "--factors", "0.1,0.2", minimum=0),
                   help="contrastive factors (default 0.1,0.2,0.4,0.8)")
    g.add_argument("--nproj", metavar="N,N", type=number_list(int, "--nproj", "1,2", minimum=1),
                   help="projection depths (default 1,2,4)")
    g.add_argument("--proj-dims", metavar="D,D", type=number_list(int, "--proj-dims", "128,256", minimum=1),
                   help="projection widths (default 128,256,512,1024)")
    add_train_options(p)
    p.set_defaults(func=run)


def is_test_transform(transform: str) -> bool:
    """A store of clean test views: `rine extract --transform center|ten`, or the cache of a
    clean `rine eval` (`eval:<crop>:<size>:clean`), not augmented or perturbed images."""
    return transform.startswith(("center-crop/", "ten-crop/")) or (
        transform.startswith("eval:") and transform.endswith(":clean"))


def run(args: argparse.Namespace) -> int:
    from ..data.tap_store import FeatureStore, StoreError
    from ..training.grid import PAPER_GRID, grid_configs, run_grid, write_table
    from ..training.trainer import StoreTaps, save_run

    try:
        args.out = str(check_output_dir(args.out))
    except CLIError as e:
        return fail(str(e))
    try:
        base = train_config_from_args(args)
        store = FeatureStore.open(args.features)
        tests = [FeatureStore.open(t) for t in args.test_features]
        val = FeatureStore.open(args.val_features) if args.val_features else None
    except (StoreError, ValueError, OSError) as e:
        return fail(str(e))
    ident = (store.meta["backbone"], store.meta["revision"])
    for other in [*tests, *([val] if val else [])]:
        if (other.meta["backbone"], other.meta["revision"]) != ident:
            return fail(f"{other.root} was made with backbone {other.meta['backbone']!r}, "
                        f"the training store with {ident[0]!r}")
    if not store.complete:
        return fail(f"{args.features} is incomplete: rerun its `rine extract` command to finish it")
    for other in [*tests, *([val] if val else [])]:
        if not is_test_transform(str(other.meta.get("transform", ""))):
            print(f"rine: warning: {other.root} was extracted with {other.meta.get('transform')!r}, not a "
                  "test transform: runs are ranked on augmented images (use --transform center or ten)",
                  file=sys.stderr)
    given = {"factor": args.factors, "nproj": args.nproj, "proj_dim": args.proj_dims}
    configs = grid_configs({k: PAPER_GRID[k] if v is None else v for k, v in given.items()}, base)
    from pathlib import Path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs, best = run_grid(StoreTaps(store, preload=None), tests, configs, val=val, log_path=out / "grid_log.jsonl")
    write_table(runs, out)
    save_run(best, runs[0].config, out / "best", store.meta["backbone"], store.meta["revision"],
             name="rine-grid-best", meta={"features": str(Path(args.features).resolve()), "grid_rank": 1,
                                          "mean_acc": runs[0].mean_acc, "mean_ap": runs[0].mean_ap})
    print(f"{'rank':>4} {'factor':>6} {'nproj':>5} {'proj_dim':>8} {'mean_acc':>8} {'mean_ap':>8}", file=sys.stderr)
    for i, r in enumerate(runs[:10], 1):
        c = r.config
        print(f"{i:>4} {c.factor:>6} {c.nproj:>5} {c.proj_dim:>8} {r.mean_acc:>8.4f} {r.mean_ap:>8.4f}", file=sys.stderr)
    print(f"{out}: {len(runs)} runs ranked in grid.csv; best checkpoint in {out / 'best'}", file=sys.stderr)
    return 0
