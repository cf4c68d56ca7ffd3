"""pycocotools' COCOeval as the independent reference for the AP that the EZSD eval stage
reports per category group (imported by the tests that check it)."""
import contextlib
import copy
import io


def cocoeval_ap(gt_file: str, dets: list, names, iou_type: str = "bbox") -> tuple[float, float]:
    """(AP, AP50) that COCOeval gives `dets` on the categories named `names` of `gt_file`,
    over all its images (0 where there are no detections or no GT, as our summary)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(gt_file)
        ids = [c["id"] for c in gt.loadCats(gt.getCatIds()) if c["name"] in names]
        mine = [copy.deepcopy(d) for d in dets if d["category_id"] in ids]  # loadRes edits
        if not mine:
            return 0.0, 0.0
        ev = COCOeval(gt, gt.loadRes(mine), iou_type)
        ev.params.imgIds, ev.params.catIds = sorted(gt.getImgIds()), ids
        ev.evaluate(), ev.accumulate(), ev.summarize()
    return max(float(ev.stats[0]), 0.0), max(float(ev.stats[1]), 0.0)
