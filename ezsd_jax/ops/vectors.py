"""Vector ops shared by the CLIP teacher (text and image embeddings, proposals,
re-normalization) and the EZSD RoI head (region embeddings, class embeddings)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """x / max(||x||_2, eps) along `axis`, computed and returned in float32."""
    x = jnp.asarray(x).astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


__all__ = ["l2_normalize"]
