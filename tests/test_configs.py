"""Every config file in configs/ builds: get_config() returns a ConfigDict that serializes
(what cli.save_config writes), its stages exist in ezsd_jax.stages, and a detector config
(config.model with an image size) passes DetectorConfig / EZSDHeadConfig validation."""
import importlib
import pathlib

import ml_collections
import pytest

from ezsd_jax.models.config import DetectorConfig
from ezsd_jax.stages import STAGES
from ezsd_jax.models.ezsd_head import EZSDHeadConfig

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
CONFIG_FILES = sorted(p.stem for p in CONFIG_DIR.glob("*.py")
                      if "def get_config" in p.read_text())


def _stage_names() -> set:
    return set(STAGES)


def test_every_config_file_is_listed():
    assert len(CONFIG_FILES) >= 12 and "demo" in CONFIG_FILES and "coco" in CONFIG_FILES


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_get_config_builds(name):
    stages = _stage_names()
    assert {"toy", "demo_data", "ezsd_train", "ezsd_eval"} <= stages
    cfg = importlib.import_module(f"configs.{name}").get_config()
    assert isinstance(cfg, ml_collections.ConfigDict)
    assert cfg.to_json_best_effort()
    for stage in cfg.get("stages", ()):
        assert stage in stages, f"configs/{name}.py: unknown stage {stage!r}"
    model = cfg.get("model")
    if model is not None and "image_size" in model:
        dcfg = DetectorConfig.from_config(model, num_classes=3)
        if dcfg.roi_head == "ezsd":
            assert EZSDHeadConfig.from_detector(dcfg).embed_dim > 0


def test_a_stored_run_keeps_the_behaviour_it_was_trained_with(tmp_path):
    """A run's config.json written before a model field existed is read with the behaviour
    that run had (black padding), a current one with its own value; both build."""
    import json

    from configs import common
    from ezsd_jax.predict.trained_run import read_config
    model = common.tiny_model_config().to_dict()
    old = {k: v for k, v in model.items()
           if k not in ("input_padding", "rpn_low_quality_min_iou", "roi_low_quality_min_iou")}
    for name, m, padding in (("old", old, "black"), ("new", model, "mean")):
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({"model": m}))
        cfg = read_config(str(p))
        dcfg = DetectorConfig.from_config(cfg.model, num_classes=3)
        assert dcfg.input_padding == padding
    assert DetectorConfig.from_config(read_config(str(tmp_path / "old.json")).model,
                                      num_classes=3).rpn_low_quality_min_iou == 0.0
