"""EZSD on LVIS v1 (base = frequent + common, novel = rare), generalized evaluation with
the LVIS protocol (AP, APr, APc, APf; 300 detections per image). Stages renorm ->
proposals -> ezsd_train -> ezsd_eval, as configs/coco.py.

  python -m ezsd_jax.main --config=configs/lvis.py --workdir=/ckpt/ezsd_lvis \
      --config.lvis_root=/data/lvis --config.coco_root=/data/coco \
      --config.model.pretrained=/weights/resnet50.safetensors

LVIS v1 images are COCO 2017 images: the annotation files give coco_url only and the
image directory is the COCO root holding train2017/ and val2017/.

Every value is compared with the authors' LVIS run, item by item, in docs/protocol.md
(this docstring does not repeat it). Besides the COCO protocol options (box head
'301212', train proposals 2000 -> 1000, first 200 stored proposals, renorm prompt): seesaw
loss, regression loss weight 2 (RPN and RoI), class-balanced repeat-factor sampling
(t = 0.001; 48 epochs of the repeated list, so train.steps = 0 and train.epochs = 48),
multi-scale training with the short side in 640..800 on the static 1344x1344 canvas;
renorm with the same repeats and the reference's box-size-weighted loss.
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
        short_side=800, max_side=1333, max_boxes=300, flip_prob=0.5, num_threads=16,
        short_side_range=(640, 800), repeat_threshold=1e-3)
    cfg.model = common.model_config(
        image_size=(1344, 1344), dtype="bfloat16", roi_head="ezsd", mask_on=True,
        box_head_spec="301212", box_conv_dim=256, box_fc_dim=1024,
        box_cls_loss="seesaw", seesaw_p=0.8, seesaw_q=2.0,
        rpn_reg_loss_weight=2.0, box_reg_loss_weight=2.0,
        rpn_pre_nms_topk_train=2000, rpn_post_nms_topk_train=1000,
        rpn_pre_nms_topk_test=1000, rpn_post_nms_topk_test=1000,
        test_score_threshold=0.0, test_nms_threshold=0.5, test_max_detections=300)
    cfg.model.ezsd = ezsd_head_config()
    cfg.ezsd = ezsd_config(split="lvis")
    cfg.ezsd.distill.factor = 0.5
    cfg.ezsd.distill.proposal_slots = 500
    cfg.ezsd.distill.num_proposals = 200
    cfg.ezsd.eval.protocol = "lvis"
    cfg.ezsd.eval.filter_empty_gt = True    # the reference's test set: eval_filter_empty_gt
    cfg.clip = clip_config(renorm_epochs=18, score_names="dataset")
    cfg.clip.renorm.text_layernorms = False
    cfg.clip.renorm.templates = ("a photo of a {}",)
    # renorm (cls_finetuner_clip_lvis_base_train_over_sample.py + use_size_weight=True):
    # class-balanced repeats t=0.001 and box-size-weighted loss
    cfg.clip.renorm_repeat_threshold = 1e-3
    cfg.clip.renorm.size_weight = True
    # LVIS proposals (docs/ezsd-method.md section 2): 500 per image sampled at random after the IoU
    # filter, no base-class filter.
    cfg.clip.proposals.update(dict(keep=500, selection="random", drop_base=False))
    cfg.train = reference_schedule(LVIS_TRAIN_IMAGES, epochs=48, decay_epochs=(32, 44))
    # repeat-factor sampling makes the epoch longer than LVIS_TRAIN_IMAGES: the steps are
    # 48 passes of the repeated list, counted at run time (train.train_steps)
    cfg.train.steps = 0
    cfg.train.epochs = 48.0
    cfg.eval = common.eval_config(batch_size=16)
    return cfg
