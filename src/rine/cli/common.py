"""Options and helpers shared by the commands that load a detector."""

from __future__ import annotations

import argparse
import contextlib
import decimal
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from ..data.scan import Skipped
from ..errors import OptionError, message_of
from ..inference.loading import BACKENDS, ModelOptions


class CLIError(Exception):
    """A user-facing error: printed as one message, exit code 2, no traceback."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a service manager, `kill`, a CI timeout), handled as Ctrl-C is: the command
    stops, keeps what it wrote and says how to go on; the exit status is 143 (128 + 15)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises `Terminated` in the main thread (elsewhere: no change)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "M": 2**20, "MB": 2**20, "G": 2**30, "GB": 2**30}


def byte_size(text: str) -> int:
    """argparse type for sizes: bytes, or a number with K, M or G (binary: 64M = 64 MiB)."""
    value = text.strip().upper().removesuffix("IB").removesuffix("I")
    number = value.rstrip("KMGB")
    unit = value[len(number) :]
    try:
        size = float(number) * _UNITS[unit]
    except (KeyError, ValueError, OverflowError):
        size = math.nan
    if not math.isfinite(size):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (examples: 5000000, 200K, 64M, 1G)")
    if size < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a size must be at least 1 byte")
    return int(size)


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


_COUNT_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9}


def pixel_count(text: str) -> int:
    """argparse type for pixel counts: a number, or one with K, M or G (decimal: 40M = 40,000,000)."""
    value = text.strip().upper().replace("_", "").replace(",", "")
    number = value.rstrip("KMG")
    try:
        count = decimal.Decimal(number) * _COUNT_UNITS[value[len(number) :]]  # exact: 4.1M = 4,100,000
    except (KeyError, decimal.InvalidOperation):
        count = decimal.Decimal("NaN")
    if not count.is_finite() or count < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a pixel count of at least 1 (examples: 40000000, 40M)")
    return int(count)


def check_output_dir(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be one: an existing file, or
    a place where it cannot be created. The missing folders are created and removed again
    (a real try: /proc/x as root, a read-only or full file system pass permission checks);
    nothing is left behind and an existing folder is kept as it is."""
    # Normalised first: `new/../old` must not make an existing `old` look like one to remove.
    out = Path(os.path.abspath(os.path.expanduser(path)))
    if out.exists() and not out.is_dir():
        raise CLIError(f"{option} {path}: is a file, not a folder; give a folder path (it is created)")
    parent = next((p for p in (out, *out.parents) if p.exists()), Path("."))
    if not parent.is_dir():
        raise CLIError(f"{option} {path}: {parent} is a file, so the folder cannot be created under it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {path}: no permission to write in {parent}")
    missing = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"{option} {path}: cannot create this folder ({e.strerror or e})") from None
    for folder in missing:
        try:
            folder.rmdir()
        except OSError:
            break
    return out


def check_output_file(path: str | Path, option: str = "--output") -> Path:
    """Refuse, before any work, an output file that cannot be written: a folder, or a file
    in a folder that does not exist or is not writable."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise CLIError(f"{option} {path}: is a folder; give a file name, e.g. {Path(path) / 'scores.jsonl'}")
    if out.exists():  # written in place (a file, /dev/null, a pipe): only it must be writable
        if not os.access(out, os.W_OK):
            raise CLIError(f"{option} {path}: no permission to write this file")
        return out
    folder = out.parent
    if not folder.is_dir():
        raise CLIError(f"{option} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CLIError(f"{option} {path}: no permission to create a file in {folder}")
    return out


def flag(name: str) -> str:
    """A library parameter's CLI flag: model_revision -> --model-revision."""
    return "--" + name.replace("_", "-")


def cli_error(error: BaseException) -> CLIError:
    """A library error as the CLI says it: parameters named by their flags."""
    if isinstance(error, OptionError):
        return CLIError(error.render(flag))
    return CLIError(message_of(error))


def check_device(device: str) -> None:
    """CLIError for a --device torch cannot use here, named with the fix (before loading)."""
    from ..inference import loading

    try:
        loading.check_device(device)
    except OptionError as e:
        raise cli_error(e) from None


def add_model_options(
    parser: argparse.ArgumentParser,
    crops: tuple[str, ...] = ("center", "ten", "resize"),
    repeatable: bool = False,
    batch_jobs: bool = True,
    backends: bool = True,
) -> None:
    """The model options shared by every command; `repeatable` lets --model and --head be
    given several times (a list in `args`), for commands that compare heads. `batch_jobs`
    offers --compile, which pays off over long runs of same-sized batches (not in a server,
    whose batches have whatever size the traffic gives)."""
    from ..config import PRECISIONS
    from ..model.pretrained import DEFAULT_MODEL, list_pretrained

    g = parser.add_argument_group("model")
    again = "; repeat to compare several on one backbone pass" if repeatable else ""
    g.add_argument(
        "--model",
        default=None,
        action="append" if repeatable else "store",
        metavar="NAME|DIR",
        help=f"pretrained name ({', '.join(list_pretrained())}), a checkpoint folder "
        f"(config.json + model.safetensors) or a Hub model repo user/repo (rine push). Default: {DEFAULT_MODEL}{again}",
    )
    g.add_argument(
        "--backbone",
        metavar="SRC",
        help="CLIP backbone: a name (ViT-L/14), a hub id, a save_pretrained folder or an "
        "OpenAI-format file (ViT-L-14.pt). With --head, replaces --model; with --model, "
        "overrides where its backbone is loaded from",
    )
    g.add_argument("--revision", help="hub revision of --backbone (commit, tag or branch)")
    g.add_argument("--model-revision", metavar="REV", help="hub revision of a --model user/repo (default main)")
    g.add_argument(
        "--head",
        action="append" if repeatable else "store",
        metavar="FILE|DIR",
        help=f"head weights: an official *_trainable.pth or a checkpoint folder{again}",
    )
    g.add_argument(
        "--crop",
        choices=crops,
        default=None,
        help="center: the paper's test transform (no resize); resize: shorter side to 224 then "
        "centre crop; ten: ten crops, sigmoid of the mean logit. Default: the model's own",
    )
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=PRECISIONS[0],
        help="encoder arithmetic. auto (default): int8-smooth on CPUs with VNNI or AMX-INT8, else "
        "bf16 on CPUs with AVX-512 BF16/AMX (about 3x faster; a probability may move by about "
        "0.01), fp16 on CUDA, else fp32; fp32: exact, the mode the parity tests check; "
        "int8-smooth: int8 matrix products in the last third of the blocks (SmoothQuant-style "
        "smoothing folded into the LayerNorms), bf16 before, within the tolerance (benchmark, "
        "official head: max 0.011, mean 0.0015); "
        "int8: int8 in every block, faster, outside the tolerance and so never chosen by auto: "
        "up to 0.11 (mean 0.0085) (docs/performance.md)",
    )
    if backends:
        add_backend_options(g)
    if not batch_jobs:
        return
    g.add_argument(
        "--compile",
        action="store_true",
        help="compile the encoder with torch.compile before scoring: 30-60 s at start and a "
        "second copy of the weights in memory (needs a C++ compiler on CPU; falls back to "
        "uncompiled with a warning). Then about 15%% faster with --precision fp32 on CPU; no "
        "gain in bf16. Worth it for thousands of images in fp32",
    )


def add_backend_options(group: argparse._ArgumentGroup) -> None:
    """--backend and --providers: who runs the encoder + head (docs/deployment.md)."""
    group.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="torch: the PyTorch model; onnxruntime: an ONNX export folder (made by `rine export "
        "--format onnx`) given as --model DIR, run by ONNX Runtime. Default auto: onnxruntime "
        "when --model is an export folder, else torch. Decoding, batching and the probability "
        "are the same code either way",
    )
    group.add_argument(
        "--providers",
        metavar="LIST",
        help="with onnxruntime: execution providers in priority order, e.g. tensorrt,cuda "
        "(short names cpu, cuda, tensorrt, or ONNX Runtime's full names; CUDA and TensorRT need "
        "the onnxruntime-gpu package). Default: cpu, or cuda with --device cuda",
    )


def model_options(args: argparse.Namespace) -> ModelOptions:
    """The model flags of `args` as the loader's options (the first of a repeated --model/--head)."""

    def first(value):
        return value[0] if isinstance(value, list) else value

    return ModelOptions(
        model=first(args.model) or None, backbone=args.backbone, head=first(args.head) or None,
        revision=args.revision, model_revision=getattr(args, "model_revision", None), crop=args.crop,
        # commands without --backend run torch (an export folder is no model for them)
        backend=getattr(args, "backend", "torch") or "torch", providers=getattr(args, "providers", None),
        device=args.device, precision=args.precision, compile=getattr(args, "compile", False),
        threads=getattr(args, "threads", None),
    )


def resolve_backend(args: argparse.Namespace) -> str:
    """"torch" or "onnxruntime" for the model options in `args` (CLIError when they do not fit)."""
    from ..inference import loading

    try:
        return loading.resolve_backend(model_options(args))
    except OptionError as e:
        raise cli_error(e) from None


def add_decoding_options(group: argparse._ArgumentGroup) -> None:
    """--workers, --decoder and --decode-timeout, shared by the commands that decode images."""
    from ..data.decoding import DECODERS, DEFAULT_DECODE_TIMEOUT

    group.add_argument("--workers", type=positive_int, default=None,
                       help="decoding workers (default: one per core, up to 8 on CPU and 32 with a GPU)")
    group.add_argument("--decoder", choices=DECODERS, default="auto",
                       help="decode in threads or worker processes (default auto: processes with a GPU, "
                            "where decoding is the bottleneck; threads on CPU)")
    group.add_argument("--decode-timeout", type=float, default=DEFAULT_DECODE_TIMEOUT, metavar="SECONDS",
                       help="with --decoder processes: skip an image still decoding after this long, stopping "
                            f"its worker (default {DEFAULT_DECODE_TIMEOUT:g}; 0: no limit)")


def decode_options(args: argparse.Namespace, detector=None):
    """--workers, --decoder and --decode-timeout (0: no limit) as `DecodeOptions`, with the
    detector's image limits (--max-pixels / --max-bytes where the command has them)."""
    from ..data.decoding import DecodeOptions

    limits = {k: getattr(detector, k, None) for k in ("max_pixels", "max_bytes")} if detector is not None else {}
    return DecodeOptions(workers=args.workers, decoder=args.decoder, timeout=args.decode_timeout or None, **limits)


def probability(text: str) -> float:
    """argparse type: a number within [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: a probability is within [0, 1]")
    return value


def add_decision_options(group: argparse._ArgumentGroup) -> None:
    """--threshold and --uncertain-band: override the cut of the model (calibrated or not)."""
    group.add_argument("--threshold", type=probability, default=None, metavar="P",
                       help="call an image synthetic when its probability is above P (default: the model's "
                            "own: 0.5, or the one fitted by rine calibrate)")
    group.add_argument("--uncertain-band", type=float, default=None, metavar="W",
                       help="give the verdict `uncertain` to probabilities within W of the threshold (e.g. "
                            "0.1; 0: none). Default: the model's own band (none unless rine calibrate set one)")


def apply_decision_options(detector, args: argparse.Namespace):
    """The detector with --threshold / --uncertain-band applied (CLIError if out of range)."""
    threshold, band = getattr(args, "threshold", None), getattr(args, "uncertain_band", None)
    if threshold is not None or band is not None:
        try:
            detector.set_decision(threshold, band)
        except ValueError as e:
            raise CLIError(str(e)) from None
    return detector


def load_detector(args: argparse.Namespace, keep_reference: bool = True):
    """Build a Detector from the model flags (`rine.inference.loading`), turning known
    failures into CLIError."""
    from ..inference import loading
    from ..inference.onnx_backend import OnnxBackendError
    from ..model.checkpoints import CheckpointError
    from ..model.pretrained import WeightsUnavailableError

    quiet = getattr(args, "no_progress", False) or not sys.stderr.isatty()
    try:
        return loading.load_detector(model_options(args), keep_reference=keep_reference, progress=not quiet)
    except WeightsUnavailableError as e:
        raise CLIError(str(e)) from None
    except (OptionError, OnnxBackendError, CheckpointError, FileNotFoundError, KeyError, ValueError) as e:
        raise cli_error(e) from None


def error_message(error: BaseException) -> str:
    """The text of an exception; a KeyError's message without the quotes str() adds."""
    return message_of(error)


def shown(path: str) -> str:
    """A path for display: name bytes that are not UTF-8 as \\xNN escapes (a terminal may be strict)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def report_skipped(skipped: Skipped, log: logging.Logger, where: str = "") -> None:
    """What a folder scan left out, as one line on stderr ("rine: WHERE: 6 files skipped: 3
    hidden, 1 .heic (...)"); each file goes to `log` at INFO, so -v lists them."""
    if not skipped.total:
        return
    for reason, names in skipped.by_reason.items():
        for name in names:
            log.info("skipped %s (%s)", shown(name), reason)
    print(f"rine: {where + ': ' if where else ''}{skipped.summary()} (-v lists them)", file=sys.stderr)


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 image`, `2 images` (`many`: the plural where it is not word + "s")."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def fail(message: str) -> int:
    print(f"rine: error: {message}", file=sys.stderr)
    return 2
