"""The built-in zero-shot demo (configs/demo.py): a small synthetic world in
which a toy CLIP really learns every category from captions while the detector never
sees a box of the novel ones.

  world    the world: categories split base / novel, detection images (clutter, busy
           backgrounds, dim lighting) and a clean single-object caption set
  stages   stages 'demo_data', 'ablation', 'demo_report'
  report   result tables and the detections PNG
"""
