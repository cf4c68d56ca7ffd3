"""The one config validator (ezsd_jax.core.config_check): every shipped config passes; each
class of bad value is rejected with the field's name."""
import importlib
import os

import pytest

from ezsd_jax.core.config_check import ConfigError, validate

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(f[:-3] for f in os.listdir(os.path.join(REPO, "configs"))
                 if f.endswith(".py") and f not in ("__init__.py", "common.py"))


def _cfg(name):
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_pass(name):
    validate(_cfg(name))


BAD = [  # (config, field, value, text the message must contain)
    ("synthetic_detection", "train.steps", 0, "config.train.steps=0: must be an integer >= 1"),
    ("synthetic_detection", "train.log_every", 0, "config.train.log_every=0"),
    ("synthetic_detection", "train.ckpt_every", -5, "config.train.ckpt_every=-5"),
    ("synthetic_detection", "train.batch_size", 0, "config.train.batch_size=0"),
    ("synthetic_detection", "eval.batch_size", -1, "config.eval.batch_size=-1"),
    ("synthetic_detection", "data.prefetch", -1, "config.data.prefetch=-1: must be an integer >= 0"),
    ("synthetic_detection", "data.flip_prob", 1.5, "config.data.flip_prob=1.5: must be a probability"),
    ("synthetic_detection", "data.on_error", "ignore",
     "config.data.on_error='ignore': must be one of 'raise', 'skip'"),
    ("demo_ci", "clip.pretrain.steps", 0, "config.clip.pretrain.steps=0"),
    ("demo_ci", "ezsd.distill.on_missing", "warn", "config.ezsd.distill.on_missing='warn'"),
    ("demo_ci", "ezsd.distill.sample", "first200", "config.ezsd.distill.sample='first200'"),
    ("demo_ci", "ezsd.distill.norm_images", 3, "must divide train.batch_size=8"),
    ("demo_ci", "ezsd.distill.norm_images", -1, "config.ezsd.distill.norm_images=-1"),
    ("demo_ci", "model.input_padding", "zero", "config.model.input_padding='zero'"),
    ("demo_ci", "model.ezsd.background_init", "zeros", "config.model.ezsd.background_init"),
    ("demo_ci", "model.rpn_low_quality_min_iou", 1.5, "an IoU; < 0: off"),
    ("demo_ci", "model.test_topk_candidates", -1, "config.model.test_topk_candidates=-1"),
    ("toy", "toy.log_every", 0, "config.toy.log_every=0"),
    ("isal_digits", "al.budget", 0, "config.al.budget=0"),
    ("isal_digits", "influence.depth", 0, "config.influence.depth=0"),
    ("demo_ci", "clip.proposal_shard", "2/2", "config.clip.proposal_shard='2/2'"),
    # steps = 0 means "from epochs": an error only when epochs is 0 too
    ("isal_cifar10", "train.epochs", 0.0, "config.train.steps=0: set it > 0, or train.epochs > 0"),
]


@pytest.mark.parametrize("name,field,value,text", BAD)
def test_bad_values_name_the_field(name, field, value, text):
    cfg = _cfg(name)
    node = cfg
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert text in str(e.value) and "\n" not in str(e.value)
