"""The model card (`README.md`) of a RINE checkpoint pushed to the Hub (`rine push`).

    text = model_card(config, repo_id="user/rine-opensdi", eval_dir=Path("runs/opensdi"))

It says what the model is (a RINE head on a frozen CLIP backbone, pinned by revision),
how it was trained (the checkpoint's `meta`), the evaluation table of the last `rine eval`
run of it when that folder is given (its `leaderboard.md`/`balanced.md`, else `table.md`
or `summary.md`, verbatim), the licences of the head and of the backbone it needs, and
how to load it. The YAML header gives the Hub's library, licence and tags.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import RINEConfig

# The licences of the backbones of the registry (the weights' own, from their model cards).
BACKBONE_LICENSES = {"openai/clip-vit-large-patch14": "MIT (OpenAI CLIP)",
                     "openai/clip-vit-base-patch32": "MIT (OpenAI CLIP)",
                     "openai/clip-vit-base-patch16": "MIT (OpenAI CLIP)"}
EVAL_TABLES = ("leaderboard.md", "balanced.md", "table.md", "summary.md")


def _backbone_hub_id(config: RINEConfig) -> str:
    from .registry import BACKBONES

    spec = BACKBONES.get(config.backbone)
    return spec.hub_id if spec is not None else config.backbone


def is_local_backbone(config: RINEConfig) -> bool:
    """A backbone recorded as a path on the machine that trained the head: not portable."""
    b = config.backbone
    return b.startswith(("/", "./", "../", "~")) or Path(b).expanduser().exists()


def eval_section(eval_dir: Path) -> str:
    """The tables of a `rine eval` output folder and where they come from."""
    tables = [eval_dir / n for n in EVAL_TABLES if (eval_dir / n).is_file()]
    if not tables:
        raise FileNotFoundError(f"{eval_dir} holds no rine eval table ({', '.join(EVAL_TABLES)})")
    meta: dict = {}
    for name in ("eval_config.json", "metrics.json"):
        if (eval_dir / name).is_file():
            data = json.loads((eval_dir / name).read_text(encoding="utf-8"))
            meta = data.get("meta", data)
            break
    where = meta.get("hub") or {}
    data = (where.get("dataset") if isinstance(where, dict) else None) or meta.get("root", "?")
    lines = ["## Evaluation", "",
             f"`rine eval --suite {meta.get('suite', '?')}` on `{data}` (threshold {meta.get('threshold', 0.5)}, "
             f"rine {meta.get('rine_version', '?')}, precision {meta.get('precision', '?')}):", ""]
    for t in tables[:2]:  # the headline table, then the engine's own
        lines += [t.read_text(encoding="utf-8").strip(), ""]
    return "\n".join(lines)


def model_card(config: RINEConfig, repo_id: str, eval_dir: Path | None = None, license: str = "apache-2.0") -> str:
    """The README.md text of `repo_id`."""
    bb_id = _backbone_hub_id(config)
    bb_license = BACKBONE_LICENSES.get(bb_id, "see the backbone's own model card")
    training = {k: v for k, v in config.meta.items() if k not in ("description",)}
    head = config.head
    header = ["---", "library_name: rine", f"license: {license}", "pipeline_tag: image-classification",
              "tags:", "- ai-generated-image-detection", "- synthetic-image-detection", "- rine", "- clip"]
    if not is_local_backbone(config):
        header += ["base_model:", f"- {bb_id}"]
    header.append("---")
    lines = [*header, "", f"# {config.name or repo_id}", "",
             "A [RINE](https://github.com/mever-team/rine) detector of AI-generated images (ECCV 2024): the CLS "
             "tokens of every block of a frozen CLIP encoder, weighted by a trainable importance estimator, and a "
             "small trainable head. This repository holds the head only (`model.safetensors`) and its "
             "configuration (`config.json`); the backbone is loaded from its own pinned source.", "",
             "| | |", "|---|---|",
             f"| backbone | `{config.backbone}` ({bb_id}) at revision `{config.backbone_revision or 'as recorded'}` |",
             f"| head | {head.n_blocks} blocks x {head.in_dim}, nproj {head.nproj}, proj_dim {head.proj_dim} |",
             f"| preprocessing | {config.preprocess.crop} crop, {config.preprocess.image_size} px |",
             f"| decision threshold | {config.threshold} |", ""]
    if config.meta.get("description"):
        lines += [str(config.meta["description"]), ""]
    lines += ["## Training", ""]
    if training:
        lines += ["```json", json.dumps(training, indent=2, ensure_ascii=False, default=str), "```", ""]
    else:
        lines += ["The checkpoint records no training details.", ""]
    if eval_dir is not None:
        lines += [eval_section(Path(eval_dir)), ""]
    lines += ["## Licences", "",
              f"- head (this repository): {license}",
              f"- backbone `{bb_id}`: {bb_license}; it is downloaded from its own repository, not from this one", ""]
    if is_local_backbone(config):
        lines += ["> The backbone was recorded as a local path on the machine that trained the head; pass the same "
                  "CLIP weights with `--backbone` (or `backbone=`) to load it.", ""]
    lines += ["## Usage", "", "```bash", "pip install rine",
              f"rine detect --model {repo_id} image.jpg", "```", "", "```python",
              "from rine.inference.detector import Detector", "",
              f'detector = Detector.from_pretrained("{repo_id}")  # revision="..." pins a commit',
              'print(detector.predict(["image.jpg"]))', "```", ""]
    return "\n".join(lines)
