"""EZSD on LVIS v1 (base = frequent + common, novel = rare), generalized evaluation with
the LVIS protocol (AP, APr, APc, APf; 300 detections per image). Stages renorm ->
proposals -> ezsd_train -> ezsd_eval, as configs/coco.py.

  python -m ezsd_jax.main --config=configs/lvis.py --workdir=/ckpt/ezsd_lvis \
      --config.lvis_root=/data/lvis --config.coco_root=/data/coco \
      --config.model.pretrained=/weights/resnet50.safetensors

LVIS v1 images are COCO 2017 images: the annotation files give coco_url only and the
image directory is the COCO root holding train2017/ and val2017/.

Deviations from the reference (docs/ezsd-method.md sections 1-3), besides those of configs/coco.py:
  - No class-balanced (repeat-factor) sampling and no seesaw loss: the data pipeline
    samples uniformly and the classifier uses softmax cross-entropy (not implemented yet).
  - The reference's box-loss weight 2.0 is not applied: DetectorConfig.box_loss_weight
    scales classification and regression together, and 2.0 on both is not the reference.
  - The 48-epoch schedule drops the lr at epochs 32 and 44 (scaled 1x rule, our choice).
  - Distillation samples 200 of the 500 stored proposals per image and step (the note
    does not say how many the reference uses on LVIS), loss factor 0.5.
  - Text-tower LayerNorms stay frozen in re-normalization (as the reference on LVIS).
"""

from configs import common
from configs.coco import clip_config, ezsd_config, ezsd_head_config, reference_schedule

LVIS_TRAIN_IMAGES = 100170   # lvis_v1_train.json


def get_config():
    cfg = common.base_config()
    cfg.stages = ("renorm", "proposals", "ezsd_train", "ezsd_eval")
    cfg.lvis_root = "/data/lvis"
    cfg.coco_root = "/data/coco"
    lvis, coco = cfg.get_ref("lvis_root"), cfg.get_ref("coco_root")
    cfg.data = common.data_config(
        train_ann=lvis + "/lvis_v1_train.json", train_images=coco,
        val_ann=lvis + "/lvis_v1_val.json", val_images=coco,
        short_side=800, max_side=1333, max_boxes=300, flip_prob=0.5, num_threads=16)
    cfg.model = common.model_config(
        image_size=(1344, 1344), dtype="bfloat16", roi_head="ezsd", mask_on=True,
        box_num_convs=4, box_conv_dim=256, box_num_fcs=2, box_fc_dim=1024,
        rpn_pre_nms_topk_train=2000, rpn_post_nms_topk_train=2000,
        rpn_pre_nms_topk_test=1000, rpn_post_nms_topk_test=1000,
        test_score_threshold=0.0, test_nms_threshold=0.5, test_max_detections=300,
        test_topk_candidates=8192)
    cfg.model.ezsd = ezsd_head_config()
    cfg.ezsd = ezsd_config(split="lvis")
    cfg.ezsd.distill.factor = 0.5
    cfg.ezsd.distill.proposal_slots = 500
    cfg.ezsd.distill.num_proposals = 200
    cfg.ezsd.eval.protocol = "lvis"
    cfg.clip = clip_config(renorm_epochs=18)
    cfg.clip.renorm.text_layernorms = False
    # LVIS proposals (docs/ezsd-method.md section 2): 500 per image sampled at random after the IoU
    # filter, no base-class filter.
    cfg.clip.proposals.update(dict(keep=500, selection="random", drop_base=False))
    cfg.train = reference_schedule(LVIS_TRAIN_IMAGES, epochs=48, decay_epochs=(32, 44))
    cfg.eval = common.eval_config(batch_size=16)
    return cfg
