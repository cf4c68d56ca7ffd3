"""A predict bundle without training (imported by the tests of predict's outputs, the
serve page and the installed commands): the tiny detector of configs/common with random
weights and a fixed vocabulary of random unit text embeddings, exported by bundle.export,
so `Detector.load(path)` and `ezsd-predict --workdir=path` read it like a real run's."""
import numpy as np


def make_bundle(path: str, names, mask_on: bool = False, image_size=(64, 64),
                seed: int = 0) -> str:
    import jax
    from configs import coco, common
    from ezsd_jax.ezsd.stages import head_config
    from ezsd_jax.models import detector as det
    from ezsd_jax.predict import bundle
    from ezsd_jax.predict.detector import Detector
    from ezsd_jax.predict.trained_run import to_device

    cfg = coco.get_config()
    model = common.tiny_model_config(image_size=image_size, mask_on=mask_on,
                                     roi_head="ezsd", test_max_detections=10,
                                     rpn_pre_nms_topk_test=64, rpn_post_nms_topk_test=16)
    model.ezsd = cfg.model.ezsd
    model.ezsd.embed_dim = 16
    cfg.model = model
    cfg.data.short_side, cfg.data.max_side = int(image_size[0]), int(image_size[1])
    cfg.ezsd.split = "names"
    cfg.ezsd.base_names, cfg.ezsd.novel_names = tuple(names[:-1]), tuple(names[-1:])
    dcfg, hcfg = head_config(cfg, len(names))
    emb = np.random.default_rng(seed).normal(size=(len(names), hcfg.embed_dim))
    emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32)
    variables = det.init_variables(det.FasterRCNN(dcfg), jax.random.key(seed), 1, emb)
    d = Detector(cfg, to_device(jax.device_get(variables)), None, step=1, source=path,
                 base=names[:-1], novel=names[-1:],
                 fixed_embeddings={("single", n): e for n, e in zip(names, emb)})
    return bundle.export(d, path, list(names))


def shape_image(hw=(64, 64), box=(16, 20, 30, 24), colour=(230, 40, 40),
                seed: int = 0) -> np.ndarray:
    """uint8 HxWx3 grey noise with one filled rectangle (x, y, w, h)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(90, 140, size=(*hw, 3)).astype(np.uint8)
    x, y, w, h = box
    img[y:y + h, x:x + w] = colour
    return img
