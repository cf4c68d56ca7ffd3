"""Built-in demo (`make demo`).

Until the zero-shot demo exists, this runs the largest end-to-end job that does: the
detection core on a generated synthetic COCO-format set (synth_data -> train -> eval), a
tiny ResNet-FPN Faster R-CNN trained on CPU in a few minutes, evaluated with COCOeval.
"""
from configs import synthetic_detection


def get_config():
    return synthetic_detection.get_config()
