"""`rine push`: upload a RINE checkpoint folder to the Hugging Face Hub, with a model card.

Examples:
  rine push runs/train/best user/rine-opensdi-sd15 --eval runs/opensdi
  rine push ckpt/ org/rine-head --private --revision main --message "retrained on 4 classes"

The folder must hold config.json and model.safetensors (what `rine train` writes). The card
(README.md) says what the model is, how it was trained (the checkpoint's recorded
settings), the table of the `rine eval` output folder given with --eval, the licences of
the head and of the backbone, and how to load it: `rine detect --model REPO_ID` or
`Detector.from_pretrained("REPO_ID", revision=...)`; the backbone keeps coming from its
own pinned source. The token is huggingface_hub's usual one (HF_TOKEN or `hf auth login`);
HF_ENDPOINT points at another Hub.

Exit status: 0 uploaded (or --dry-run written), 2 bad usage, a bad folder or an upload error.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from .common import fail


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="upload a checkpoint folder to the Hugging Face Hub with a model card",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="DIR", help="checkpoint folder (config.json + model.safetensors)")
    p.add_argument("repo_id", metavar="REPO_ID", help="Hub model repo, user/name (created if absent)")
    p.add_argument("--eval", metavar="DIR", help="a `rine eval --out` folder whose table goes into the card")
    p.add_argument("--license", default="apache-2.0", help="licence of the head (default apache-2.0, rine's)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, help="branch to commit to (default main)")
    p.add_argument("--message", default=None, help="commit message (default: 'Upload RINE checkpoint')")
    p.add_argument("--dry-run", action="store_true", help="write the card to DIR/README.md and upload nothing")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import CONFIG_NAME, WEIGHTS_NAME
    from ..data.hub import is_repo_id
    from ..model.checkpoints import CheckpointError, load_pretrained
    from ..model.hub_card import is_local_backbone, model_card

    folder = Path(args.folder).expanduser()
    missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (folder / n).is_file()]
    if missing:
        return fail(f"{folder} is not a checkpoint folder: missing {', '.join(missing)} (rine train writes both)")
    if not is_repo_id(args.repo_id):
        return fail(f"REPO_ID {args.repo_id!r}: write it as user/name")
    try:
        _, config = load_pretrained(folder)  # a folder that does not load must not be published
        card = model_card(config, args.repo_id, Path(args.eval).expanduser() if args.eval else None, args.license)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        return fail(str(e))
    if is_local_backbone(config):
        print(f"rine: warning: the backbone is recorded as a local path ({config.backbone}); users of "
              f"{args.repo_id} will need --backbone", file=sys.stderr)
    if args.dry_run:
        (folder / "README.md").write_text(card, encoding="utf-8")
        print(f"rine: card written to {folder / 'README.md'} (dry run, nothing uploaded)", file=sys.stderr)
        return 0
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    # Only the checkpoint and its card travel: a training folder also holds logs and stores.
    with tempfile.TemporaryDirectory(prefix="rine-push-") as tmp:
        stage = Path(tmp)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            shutil.copyfile(folder / name, stage / name)
        (stage / "README.md").write_text(card, encoding="utf-8")
        api = HfApi()
        try:
            url = api.create_repo(args.repo_id, repo_type="model", private=args.private, exist_ok=True)
            info = api.upload_folder(repo_id=args.repo_id, folder_path=stage, repo_type="model",
                                     revision=args.revision, commit_message=args.message or "Upload RINE checkpoint")
        except (HfHubHTTPError, OSError, ValueError) as e:
            return fail(f"upload to {args.repo_id} failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    print(f"rine: pushed {folder} to {url} (commit {getattr(info, 'oid', '?')})", file=sys.stderr)
    print(f"rine: load it with `rine detect --model {args.repo_id} IMAGE`", file=sys.stderr)
    return 0
