"""The one loader (`rine.inference.loading`): what `rine batch`'s driver reads without loading
is what the actors load, for every model source."""

from __future__ import annotations

from support.checkpoints import official_pth


def test_the_driver_plans_with_the_config_the_loader_gives(tmp_path, tiny_openai_file, tiny_backbone_dir,
                                                           sensitive_checkpoint_dir):
    """`rine batch`'s driver reads the model's config without loading it (describe_model);
    it must be the config of the detector the actors load, for every model source: an
    official .pth head (which records none: the backbone's size, centre crop), a head folder,
    a checkpoint folder, with and without a crop override."""
    from rine.cluster.job import BatchConfig, describe_model
    from rine.inference.loading import ModelOptions, load_detector

    pth = official_pth(tmp_path, sensitive_checkpoint_dir)
    sources = [dict(backbone=str(tiny_openai_file), head=str(pth)), dict(backbone=str(tiny_backbone_dir), head=str(pth)),
               dict(backbone=str(tiny_backbone_dir), head=str(sensitive_checkpoint_dir)),
               dict(model=str(sensitive_checkpoint_dir))]
    for source in sources:
        for crop in (None, "ten"):
            spec, config = describe_model(BatchConfig(inputs=[], out="", crop=crop, precision="fp32", **source))
            loaded = load_detector(ModelOptions(**spec, backend="torch"), keep_reference=False).config
            assert config == loaded, (source, crop)
            assert config.preprocess.crop == (crop or loaded.preprocess.crop)
