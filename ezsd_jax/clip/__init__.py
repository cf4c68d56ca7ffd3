"""CLIP side of EZSD: the teacher that the detector distills.

  loading    load_clip: a real checkpoint / hub name, the adapted CLIP or a toy directory
  toy        the tiny random test/demo CLIP + its own BPE tokenizer
  text       jittable CLIP towers, prompt-ensembled text embeddings, their .npz files
  crops      batched on-device crop / zero-pad-to-square / resize / normalize of boxes
  renorm     stage 1: LayerNorm-only tuning of CLIP on base GT crops (+ driver)
  proposals  stage 2: sliding-window CLIP proposals with entropy scores, NMS, features
  store      on-disk per-image proposal shards (atomic, resumable)
Submodules are imported on use (`from ezsd_jax.clip import crops`), so importing the
package stays cheap.
"""
