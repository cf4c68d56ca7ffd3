"""reference.source='heldout' (isal_jax.selection_io.heldout_split, classification_al):
the split is deterministic per (labeled ids, cycle seed) and disjoint, its size follows
heldout_fraction / heldout_size, the config validator rejects bad values in one line, and
one AL cycle on digits trains the selection model without the held-out ids, sums v over
them and records them in the cycle's lissa.json."""
import json

import ml_collections
import numpy as np
import pytest

from ezsd_jax.core.config_check import ConfigError, validate
from isal_jax.config_schema import heldout_count
from isal_jax.selection_io import SelectError, heldout_split, reference_source


def _ref(**kw):
    return ml_collections.ConfigDict({"source": "heldout", "ids_file": "",
                                      "heldout_fraction": 0.2, "heldout_size": 0, **kw})


def test_split_is_seeded_disjoint_and_sized():
    labeled = np.random.default_rng(3).choice(1000, 50, replace=False)
    keep, held = heldout_split(labeled, 7, _ref())
    assert len(held) == 10 and len(keep) == 40
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.sort(labeled))
    keep2, held2 = heldout_split(labeled[::-1], 7, _ref())      # order does not matter
    assert np.array_equal(held, held2) and np.array_equal(keep, keep2)
    assert not np.array_equal(held, heldout_split(labeled, 8, _ref())[1])   # seed does
    assert len(heldout_split(labeled, 7, _ref(heldout_size=3))[1]) == 3
    assert heldout_count(30, 0.2) == 6 and heldout_count(3, 0.01) == 1
    assert heldout_count(30, 0.2, 5) == 5
    with pytest.raises(SelectError, match="nothing to train"):
        heldout_split([1, 2], 0, _ref(heldout_size=2))
    assert reference_source(_ref()) == ("heldout", "")


@pytest.mark.parametrize("field,value,text", [
    ("reference.source", "held_out", "must be 'labeled', 'heldout'"),
    ("reference.heldout_fraction", 1.0, "heldout_fraction=1.0: must be a number in (0, 1)"),
    ("reference.heldout_fraction", 0.0, "heldout_fraction"),
    ("reference.heldout_size", -1, "heldout_size=-1: must be an integer >= 0"),
    ("reference.heldout_size", 30, "holding out 30 of al.initial=30"),
])
def test_validator_rejects_bad_heldout_settings(field, value, text):
    cfg = ml_collections.ConfigDict({"al": {"initial": 30}, "reference": _ref()})
    validate(cfg)
    cfg.update_from_flattened_dict({field: value})
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    assert text in str(e.value) and "\n" not in str(e.value)


def test_select_cli_refuses_heldout(tmp_path):
    """The standalone step cannot know what the checkpoint was trained on: one-line error."""
    from configs import isal_demo
    from isal_jax.select import run_selection
    cfg = isal_demo.get_config()
    cfg.reference.source = "heldout"
    with pytest.raises(SelectError, match="reference.source=ids_file"):
        run_selection(cfg, str(tmp_path))


@pytest.mark.slow
def test_al_select_holds_out_and_records(tmp_path):
    """ClassificationALTask.select with heldout: the selection model is trained (here: a
    recording stand-in returning an untrained model; real training is test_al_loop's) on
    the labeled ids minus the held-out part, v has the held-out size, lissa.json lists it."""
    import jax
    from test_al_loop import _cfg
    from isal_jax.classification_al import build_task
    cfg = _cfg(**{"reference.source": "heldout", "reference.heldout_fraction": 0.25,
                  "influence.solver": "cg", "influence.eig_iters": 0})
    task = build_task(cfg, str(tmp_path))
    state = task.task.init(jax.random.PRNGKey(0), task.data.image_shape)
    state = {"params": state["params"], "batch_stats": state["batch_stats"],
             "checkpoint": (str(tmp_path / "ck"), 0)}
    trained = []

    def fake_train(ids, seed, wd):
        trained.append((np.asarray(ids), seed, wd))
        return {**state, "checkpoint": (wd, 1)}
    task.train = fake_train
    labeled = np.sort(np.random.default_rng(0).choice(task.pool_ids(), 20, replace=False))
    unlabeled = np.setdiff1d(task.pool_ids(), labeled)[:256]     # one pool batch
    ids, scores = task.select("isal", state, labeled, unlabeled, 10, 1003, str(tmp_path))
    keep, held = heldout_split(labeled, 1003, cfg.reference)
    assert len(trained) == 1 and np.array_equal(trained[0][0], keep) and trained[0][1] == 1003
    assert trained[0][2] == str(tmp_path / "selection_model")
    info = json.loads((tmp_path / "lissa.json").read_text())
    assert info["reference"] == "heldout" and info["heldout_ids"] == held.tolist()
    assert info["num_reference"] == 5 and info["num_selection_model_train"] == 15
    assert len(ids) == 10 and np.isin(ids, unlabeled).all() and np.all(np.diff(scores) >= 0)
    task.train = lambda *a: pytest.fail("baselines train no selection model")
    task.select("margin", state, labeled, unlabeled, 10, 1003, str(tmp_path / "m"))
