"""Grid search on stored taps: ranking by mean ACC + mean AP, the best checkpoint is that run's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from rine.training.grid import PAPER_GRID, grid_configs, run_grid
from rine.training.trainer import (
    StoreTaps,
    TrainConfig,
    average_precision,
    probabilities,
    score_taps,
    train_head,
)

from support.training_stores import backbone, data, stores  # noqa: F401 - shared module fixtures


def test_paper_grid_has_48_runs():
    configs = grid_configs(PAPER_GRID, TrainConfig(seed=3))
    assert len(configs) == 48 and len({(c.factor, c.nproj, c.proj_dim) for c in configs}) == 48
    assert all(c.seed == 3 and c.epochs == 1 for c in configs)


def test_grid_ranks_runs_and_keeps_the_best(stores, tmp_path):  # noqa: F811
    from rine.cli import main

    _, train32, val = stores
    out = tmp_path / "g"
    assert main(["grid", "--features", str(train32.root), "--test-features", str(val.root), "--out", str(out),
                 "--factors", "0.1,0.8", "--nproj", "1,2", "--proj-dims", "8,16", "--batch-size", "8"]) == 0
    table = json.loads((out / "grid.json").read_text())
    assert len(table) == 8 and (out / "grid.csv").is_file()
    scores = [r["score"] for r in table]
    assert scores == sorted(scores, reverse=True)
    top = table[0]
    assert set(top["metrics"]) == {"car", "cat"}  # the val store's two sets
    assert top["score"] == pytest.approx(np.mean([m["acc"] for m in top["metrics"].values()])
                                         + np.mean([m["ap"] for m in top["metrics"].values()]))
    # the saved best checkpoint is the top run, retrained identically
    cfg = TrainConfig(**{**top["config"], "lr_milestones": tuple(top["config"]["lr_milestones"])})
    head = train_head(StoreTaps(train32), cfg).head
    saved = load_file(str(out / "best" / "model.safetensors"))
    for k, v in head.state_dict().items():
        assert torch.equal(saved[k], v)
    # and its per-set metrics are those of its float32 probabilities, as the reference's
    prob = probabilities(score_taps(head, val.taps))
    for name, m in top["metrics"].items():
        sel = np.array([s == name for s in val.sets])
        y = val.labels[sel]
        assert m["acc"] == pytest.approx(np.mean((prob[sel] > 0.5) == (y == 1)))
        assert m["ap"] == pytest.approx(average_precision(y, prob[sel]))


def test_ap_counts_the_ties_of_float32_probabilities(stores):  # noqa: F811
    """Above a logit of ~16.6 float32 rounds the probability to 1.0: the reference's AP sees
    those images as tied, so the grid and validation must too (not rank them by logit)."""
    from rine.training.grid import evaluate_sets, test_sets
    from rine.training.trainer import evaluate_store

    _, train32, val = stores
    head = train_head(StoreTaps(train32), TrainConfig(nproj=1, proj_dim=8, batch_size=8)).head
    with torch.no_grad():
        head.head[-1].bias += 40.0 - float(score_taps(head, val.taps).min())  # every logit >= 40
    logits = score_taps(head, val.taps)
    assert (probabilities(logits) == 1.0).all()
    y = val.labels
    tied = float(np.mean(y == 1))  # one threshold: AP = the share of fakes
    assert average_precision(y, logits) != pytest.approx(tied)  # ranking by logit would differ
    assert evaluate_store(head, val)["ap"] == pytest.approx(tied)
    for name, m in evaluate_sets(head, test_sets([val])).items():
        sel = np.array([s == name for s in val.sets])
        assert m["ap"] == pytest.approx(float(np.mean(y[sel] == 1))) and m["acc"] == pytest.approx(float(np.mean(y[sel] == 1)))


def test_grid_needs_test_sets(stores):  # noqa: F811
    _, train32, _ = stores
    with pytest.raises(ValueError):
        run_grid(StoreTaps(train32), [], grid_configs({"nproj": (1,)}))


def test_a_run_without_any_ap_ranks_last():
    from rine.training.grid import GridRun
    from rine.training.trainer import TrainConfig

    undefined = GridRun(TrainConfig(), mean_acc=0.9, mean_ap=float("nan"))
    defined = GridRun(TrainConfig(), mean_acc=0.1, mean_ap=0.2)
    assert sorted([undefined, defined], key=lambda r: -r.rank_key) == [defined, undefined]


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--factors", "0.1,x", "argument --factors: 'x' is not a number (example: --factors 0.1,0.2)"),
        ("--factors", "0.1,-1", "argument --factors: '-1': each value must be at least 0 (example: --factors 0.1,0.2)"),
        ("--factors", "nan", "'nan' is not a finite number"),
        ("--factors", ",", "argument --factors: ',': give at least one value"),
        ("--nproj", "1,2.5", "argument --nproj: '2.5' is not a whole number (example: --nproj 1,2)"),
        ("--proj-dims", "0", "argument --proj-dims: '0': each value must be at least 1 (example: --proj-dims 128,256)"),
    ],
)
def test_grid_lists_name_the_bad_item(option, value, message, tmp_path, capsys):
    from rine.cli import main

    with pytest.raises(SystemExit) as e:
        main(["grid", "--features", "a", "--test-features", "b", "--out", str(tmp_path / "g"), option, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "_floats" not in err and "_ints" not in err and "invalid" not in err, err


def test_grid_lists_and_paper_defaults_as_the_help_says():
    from rine.cli import build_parser

    args = build_parser().parse_args(["grid", "--features", "a", "--test-features", "b", "--out", "g",
                                      "--factors", " 0.1, 0.8 ,", "--nproj", "2", "--proj-dims", "8,16"])
    assert (args.factors, args.nproj, args.proj_dims) == ((0.1, 0.8), (2,), (8, 16))
    sub = build_parser()._subparsers._group_actions[0].choices["grid"]
    helps = {a.dest: a.help for a in sub._actions}
    for dest, key in (("factors", "factor"), ("nproj", "nproj"), ("proj_dims", "proj_dim")):
        assert f"(default {','.join(map(str, PAPER_GRID[key]))})" in helps[dest]


def test_grid_refuses_a_file_as_out_before_reading_stores(stores, tmp_path, monkeypatch, capsys):  # noqa: F811
    import rine.training.grid
    from rine.cli import main
    from rine.data.tap_store import FeatureStore

    def forbidden(*a, **k):
        raise AssertionError("stores were read or runs trained before the usage check")

    monkeypatch.setattr(FeatureStore, "open", forbidden)
    monkeypatch.setattr(rine.training.grid, "run_grid", forbidden)
    _, train32, val = stores
    existing = tmp_path / "grid.csv"
    existing.write_text("keep me")
    for out, message in [(existing, f"--out {existing}: is a file, not a folder"),
                         (existing / "g", "is a file, so the folder cannot be created")]:
        assert main(["grid", "--features", str(train32.root), "--test-features", str(val.root), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("rine: error: ") and message in err and "Traceback" not in err, err
    assert existing.read_text() == "keep me"
