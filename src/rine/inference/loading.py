"""The one way to turn model options into a `Detector` (torch or ONNX Runtime).

    detector = load_detector(ModelOptions(model="rine-vitl14-4class", precision="fp32"))
    detector = load_detector(ModelOptions(backbone="ViT-L/14", head="model_4class_trainable.pth"))

`rine detect`, `rine eval`, `rine serve`, `rine batch` (its driver and every scoring actor)
and `rine export` all load here, so the same options give the same model and the same
scores wherever they run. `model_config` reads the config a load would give without loading
the weights where the checkpoint says what it needs (a folder, a named model): `rine batch`'s
driver plans with it and hands the options to the actors.

Errors: an `OptionError` (options that do not fit: `str()` names the parameters, the CLI
its flags), `UnknownNameError` for a name that is not a model, and the loaders' own
(`CheckpointError`, `WeightsUnavailableError`, `OnnxBackendError`, FileNotFoundError).
No torch at import: the CLI imports this module to build its options.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import OptionError

if TYPE_CHECKING:
    from ..config import RINEConfig
    from .detector import Detector

BACKENDS = ("auto", "torch", "onnxruntime")


@dataclass(frozen=True)
class ModelOptions:
    """What to load and how to run it (every field has the CLI flag of the same name).

    Either `model` (a pretrained name, a checkpoint folder, a Hub model repo `user/repo`, or
    an ONNX export folder) or `backbone` + `head` (an official `*_trainable.pth` or a
    checkpoint folder); with `model`, `backbone` overrides where its backbone is loaded from.
    """

    model: str | None = None
    backbone: str | None = None
    head: str | None = None
    revision: str | None = None  # hub revision of `backbone`
    model_revision: str | None = None  # hub revision of a `model` user/repo
    crop: str | None = None  # None: the model's own
    backend: str = "auto"  # auto: onnxruntime for an export folder, else torch
    providers: str | list[str] | None = None  # onnxruntime execution providers
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    threads: int | None = None  # onnxruntime intra-op threads (torch: set by the caller)

    def absolute(self) -> ModelOptions:
        """The same options with local paths made absolute (for workers that run elsewhere)."""
        return replace(self, model=absolute_path(self.model), backbone=absolute_path(self.backbone), head=absolute_path(self.head))


def absolute_path(path: str | None) -> str | None:
    """A local path made absolute (workers run elsewhere); names and hub ids as they are."""
    import os

    if path and os.path.exists(os.path.expanduser(path)):
        return os.path.abspath(os.path.expanduser(path))
    return path


def resolve_backend(options: ModelOptions) -> str:
    """"torch" or "onnxruntime" for `options` (OptionError when they do not fit)."""
    from .onnx_backend import is_onnx_export

    if options.backend not in BACKENDS:
        raise OptionError(f"{{backend}}: not a backend; use one of {', '.join(BACKENDS)}", backend=options.backend)
    export = bool(options.model) and not options.head and is_onnx_export(options.model)
    backend = ("onnxruntime" if export else "torch") if options.backend == "auto" else options.backend
    if backend == "onnxruntime" and not export:
        given = ("{model} is not an export folder" if options.model else "no {model} export folder was given")
        values = {"model": options.model} if options.model else {}
        raise OptionError("{backend}: " + given + "; make one with `rine export --format onnx --model NAME "
                          "--out DIR` and pass it as {model}", backend="onnxruntime", **values)
    if backend == "torch" and options.providers:
        raise OptionError("{providers} is for {backend}", backend="onnxruntime")
    return backend


def check_device(device: str) -> None:
    """OptionError for a device torch cannot use here, named with the fix (before loading)."""
    import torch

    try:
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                           "cpu" if device == "auto" else device)
    except RuntimeError:
        raise OptionError("{device}: not a device; use auto, cpu, cuda or cuda:N", device=device) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise OptionError(f"{{device}}: torch sees no CUDA GPU here (torch {torch.__version__}); use "
                              "{device=cpu}", device=device)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise OptionError(f"{{device}}: there are {torch.cuda.device_count()} CUDA GPU(s), numbered from 0",
                              device=device)
    elif dev.type not in ("cpu", "mps", "xpu"):
        raise OptionError("{device}: rine runs on cpu or cuda", device=device)


def _check_source(options: ModelOptions) -> None:
    if options.head:
        if options.model:
            raise OptionError("give either {model} or {backbone}/{head}, not both")
        if not options.backbone:
            raise OptionError("{head} needs {backbone} (the CLIP encoder the head was trained on)")


def load_detector(
    options: ModelOptions,
    *,
    keep_reference: bool = True,
    progress: bool = True,
    max_pixels: int | None = None,
    max_bytes: int | None = None,
) -> Detector:
    """The Detector `options` describe. `keep_reference=False` keeps only the fast encoder
    (half the memory; scoring only); `progress=False` silences the weight-loading bars;
    `max_pixels`/`max_bytes` (None: the defaults) cap what the detector decodes."""
    limits = {k: v for k, v in (("max_pixels", max_pixels), ("max_bytes", max_bytes)) if v is not None}
    _check_source(options)
    if resolve_backend(options) == "onnxruntime":
        return _load_onnx(options, **limits)
    from ..model.pretrained import DEFAULT_MODEL
    from .detector import Detector

    check_device(options.device)
    if not progress:
        _quiet_loading_bars()
    kwargs = dict(device=options.device, precision=options.precision, keep_reference=keep_reference,
                  compile=options.compile, **limits)
    if options.head:
        return Detector.from_files(options.backbone, options.head, revision=options.revision, crop=options.crop,
                                   **kwargs)
    return Detector.from_pretrained(options.model or DEFAULT_MODEL, backbone=options.backbone, crop=options.crop,
                                    revision=options.model_revision, **kwargs)


def _load_onnx(options: ModelOptions, **limits) -> Detector:
    from .onnx_backend import OnnxManifest, load_onnx_detector

    if options.backbone:
        raise OptionError("{backbone} does not apply to an ONNX export: the encoder is inside model.onnx")
    if options.compile:
        raise OptionError("{compile} is for the torch backend (ONNX Runtime optimises the graph itself)")
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise OptionError("{backend} needs the onnx extra: pip install 'rine[onnx]'", backend="onnxruntime") from None
    precision = OnnxManifest.load(options.model).precision
    if options.precision not in ("auto", precision):
        raise OptionError(f"{{precision}}: this export is {precision} (fixed at export: `rine export --fp16` makes "
                          "an fp16 one); leave {precision} out", precision=options.precision)
    return load_onnx_detector(options.model, providers=options.providers,
                              device=None if options.device == "auto" else options.device, crop=options.crop,
                              threads=options.threads, **limits)


def model_config(options: ModelOptions) -> RINEConfig:
    """The RINEConfig (crop applied) that `load_detector(options)` gives, read without
    loading the model where the checkpoint records it (folders, named models, exports); an
    official `.pth` head records no preprocessing, so its backbone's image size is read."""
    from ..config import CONFIG_NAME, RINEConfig
    from ..model.checkpoints import load_head, load_pretrained
    from ..model.pretrained import DEFAULT_MODEL, resolve_model

    _check_source(options)
    if options.head:
        head, config = load_head(options.head)
        if config is not None:
            config = replace(config, backbone=options.backbone, backbone_revision=options.revision)
        else:
            from ..model.backbones import load_backbone
            from .detector import official_head_config

            size = load_backbone(options.backbone, options.revision).image_size
            return official_head_config(head, options.head, options.backbone, options.revision, size, options.crop)
    elif resolve_backend(options) == "onnxruntime":
        config = RINEConfig.load(Path(options.model).expanduser() / CONFIG_NAME)
    else:
        name = options.model or DEFAULT_MODEL
        folder = resolve_model(name, options.model_revision, backbone_given=options.backbone)
        _, config = load_pretrained(folder)
    if options.crop:
        config = replace(config, preprocess=replace(config.preprocess, crop=options.crop))
    return config


def _quiet_loading_bars() -> None:
    """No weight-loading or download bars from transformers / huggingface_hub."""
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()
