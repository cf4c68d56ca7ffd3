"""EZSD detector side: zero-shot detection by CLIP feature distillation.

  splits     COCO 48/17 and LVIS base/novel names, split annotation files, eval groups
  distill    distillation targets from the CLIP proposal store (host extra_fn) and the
             distillation loss (device extra_loss_fn)
  lvis_eval  the LVIS evaluation protocol (AP, APr, APc, APf) on numpy + pycocotools
  stages     'ezsd_train' and 'ezsd_eval' stages for ezsd_jax.main
The EZSD RoI head itself is ezsd_jax.models.ezsd_head (model.roi_head='ezsd').
Submodules are imported on use, so importing the package stays cheap.
"""
