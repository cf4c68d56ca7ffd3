"""The paper configs encode the ISAL reference protocol exactly (values pinned here; a
change must be deliberate), and our additions stay off in them."""
from configs import isal_cifar10, isal_coco, isal_digits, isal_voc


def test_cifar10_is_the_reference_protocol():
    c = isal_cifar10.get_config()
    assert (c.al.initial, c.al.budget, c.al.cycles) == (1000, 1000, 10)
    assert c.model.name == "resnet18" and c.model.widths == (64, 128, 256, 512)
    t = c.train
    assert (t.batch_size, t.epochs, t.lr, t.momentum, t.weight_decay) == (128, 200.0, 0.1,
                                                                          0.9, 5e-4)
    assert t.decay_fractions == (0.8,) and t.gamma == 0.1 and t.augment == "flip_crop"
    assert t.crop_pad == 4
    i = c.influence
    assert (i.damp, i.scale, i.depth, i.repeats) == (0.01, 1e4, 250, 4)
    assert i.subset == "ndim_gt1" and i.pseudo_label == "argmax"
    assert (i.solver, i.damp_mode, i.diversity) == ("lissa", "fixed", "none")
    assert c.reference.source == "split:test"          # the reference's (leaky) choice
    assert c.allow_degenerate is False
    assert set(c.al.strategies) == {"isal", "random", "entropy", "margin",
                                    "least_confidence", "coreset"}
    d = isal_digits.get_config()
    assert d.reference.source == "labeled" and d.influence.damp == 0.01
    # everything else defaults to the best measured settings
    assert (d.influence.solver, d.influence.damp_mode, d.influence.diversity) == (
        "cg", "top_eig", "class_balanced")


def test_detection_configs_are_the_reference_protocol():
    for mod, (initial, budget, cycles) in ((isal_voc, (500, 500, 10)),
                                           (isal_coco, (5000, 1000, 6))):
        c = mod.get_config()
        assert (c.al.initial, c.al.budget, c.al.cycles) == (initial, budget, cycles)
        assert c.train.epochs == 12.0 and c.train.lr == 0.02 and c.train.batch_size == 16
        assert c.reference.source == "split:val"
        i = c.influence
        assert dict(i.block_scales) == {"regex:^rpn/objectness/": 1000.0,
                                        "regex:^rpn/deltas/": 1000.0,
                                        "regex:^roi_head/classifier/cls_score/": 5000.0,
                                        "regex:^roi_head/regressor/bbox_pred/": 1000.0}
        assert i.block_mode == "reference" and i.depth == 1000 and i.repeats == 4
        assert i.hvp_batch_size * i.hvp_num_batches == 1000
        assert (i.damp, i.score_threshold) == (0.01, 0.1)
        assert c.allow_degenerate is False


def test_fashion_config_scores_the_last_conv_and_the_classifier():
    """isal_fashion's subset (the regime study's best ISAL setting) names its own model's
    last conv and classifier kernels, nothing else."""
    import jax
    import jax.numpy as jnp

    from configs import isal_fashion
    from isal_jax import influence as infl
    from isal_jax.models import get_model
    c = isal_fashion.get_config()
    m = get_model(c.model.name, 10, channels=tuple(c.model.channels))
    params = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0),
                                           jnp.ones((1, 28, 28, 1))))["params"]
    sub = infl.make_subset(params, c.influence.subset)
    assert [sub.names[i] for i in sub.selected] == ["Conv_1/kernel", "Dense_0/kernel"]
    assert len(sub.names) > 2      # the rest (first conv, BN, biases) is left out
