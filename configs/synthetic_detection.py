"""Plain Faster R-CNN on a generated synthetic COCO-format set (CPU-sized): the detection
core end to end (stages synth_data -> train -> eval)."""
import ml_collections

from configs import common


def get_config():
    cfg = common.base_config()
    cfg.stages = ("synth_data", "train", "eval")
    cfg.synth = ml_collections.ConfigDict(dict(
        out_dir="",               # "" = <workdir>/synthetic
        num_categories=4, train_images=192, val_images=48, seed=0,
        image_hw_range=((96, 128), (96, 128)), objects_per_image=(1, 3),
        object_size=(20, 56), clutter=0,
    ))
    cfg.model = common.tiny_model_config(image_size=(128, 128))
    cfg.data = common.data_config(short_side=128, max_side=128, max_boxes=8, num_threads=2)
    cfg.train = common.train_config(batch_size=8, steps=300, lr=0.02, warmup_steps=50,
                                    ckpt_every=100, log_every=25)
    cfg.eval = common.eval_config(batch_size=8)
    return cfg
