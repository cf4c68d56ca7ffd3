"""torchvision ImageNet ResNet weights <-> our flax ResNet variables.

A torchvision ResNet-50 checkpoint (converted once to .safetensors, no torch at run time)
-> `load_torchvision_resnet` -> {'params', 'batch_stats'} of `models.resnet.ResNet`, merged
into the detector's variables. Nothing is downloaded here. Key mapping, input normalization
and the .pth conversion command: docs/code-notes.md.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np
from safetensors.numpy import load_file, save_file

IMAGENET_MEAN = (123.675, 116.28, 103.53)  # RGB, 0..255 pixel units
IMAGENET_STD = (58.395, 57.12, 57.375)

_BN_TORCH = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_BN_COLL = {"scale": "params", "bias": "params", "mean": "batch_stats", "var": "batch_stats"}

_CONVERT_HINT = (
    "Convert it to .safetensors where torch is installed: python -c \"import torch; "
    "from safetensors.torch import save_file; sd = torch.load('in.pth', map_location='cpu'); "
    "save_file({k: v.contiguous() for k, v in sd.items()}, 'out.safetensors')\"")


def torchvision_spec(stage_sizes: Sequence[int] = (3, 4, 6, 3), bottleneck: bool = True,
                     width: int = 64) -> list[tuple[str, tuple[str, ...], tuple[int, ...]]]:
    """All (torch key, flax path (collection, module..., leaf), torch shape), torch order."""
    spec: list[tuple[str, tuple[str, ...], tuple[int, ...]]] = []

    def conv(tkey: str, fpath: tuple[str, ...], o: int, i: int, k: int) -> None:
        spec.append((f"{tkey}.weight", ("params",) + fpath + ("kernel",), (o, i, k, k)))

    def bn(tkey: str, fpath: tuple[str, ...], c: int) -> None:
        for leaf, tname in _BN_TORCH.items():
            spec.append((f"{tkey}.{tname}", (_BN_COLL[leaf],) + fpath + (leaf,), (c,)))

    conv("conv1", ("stem_conv",), width, 3, 7)
    bn("bn1", ("stem_bn",), width)
    expansion = 4 if bottleneck else 1
    in_ch = width
    for i, n_blocks in enumerate(stage_sizes):
        planes = width * 2 ** i
        out_ch = planes * expansion
        for b in range(n_blocks):
            stride = 2 if (i > 0 and b == 0) else 1
            t, f = f"layer{i + 1}.{b}", f"layer{i + 1}_{b}"
            if bottleneck:
                convs = [(planes, in_ch, 1), (planes, planes, 3), (out_ch, planes, 1)]
            else:
                convs = [(planes, in_ch, 3), (planes, planes, 3)]
            for k, (o, ci, ks) in enumerate(convs, start=1):
                conv(f"{t}.conv{k}", (f, f"conv{k}"), o, ci, ks)
                bn(f"{t}.bn{k}", (f, f"bn{k}"), o)
            if stride != 1 or in_ch != out_ch:
                conv(f"{t}.downsample.0", (f, "downsample_conv"), out_ch, in_ch, 1)
                bn(f"{t}.downsample.1", (f, "downsample_bn"), out_ch)
            in_ch = out_ch
    return spec


def _ignored(key: str) -> bool:
    return key.startswith("fc.") or key.endswith("num_batches_tracked")


def _fmt(items: Sequence[str], limit: int = 12) -> str:
    items = list(items)
    more = f" ... (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _to_flax_array(value: np.ndarray) -> np.ndarray:
    value = np.asarray(value, dtype=np.float32)
    return value.transpose(2, 3, 1, 0) if value.ndim == 4 else value


def _set(tree: dict, path: Sequence[str], value: Any) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def torchvision_to_flax(state_dict: Mapping[str, Any],
                        stage_sizes: Sequence[int] = (3, 4, 6, 3),
                        bottleneck: bool = True, width: int | None = None,
                        prefix: str = "", strict: bool = True) -> dict[str, dict]:
    """torchvision ResNet state dict (numpy arrays) -> {'params', 'batch_stats'} for ResNet.

    width: stem width, inferred from conv1.weight when None. prefix: stripped from keys;
    keys without it are skipped. strict: unexpected keys (other than fc.* and
    num_batches_tracked) are an error. Missing keys and shape mismatches always are; the
    ValueError lists them all.
    """
    sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if width is None:
        if "conv1.weight" not in sd:
            raise ValueError(f"torchvision_to_flax: key '{prefix}conv1.weight' missing; "
                             f"cannot infer the stem width (got {_fmt(sorted(sd))})")
        width = int(np.shape(sd["conv1.weight"])[0])
    spec = torchvision_spec(stage_sizes, bottleneck, width)
    expected = {t for t, _, _ in spec}
    missing = [prefix + t for t, _, _ in spec if t not in sd]
    unexpected = sorted(prefix + k for k in sd if k not in expected and not _ignored(k))
    bad_shape = [f"{prefix}{t}: expected {shape}, got {tuple(np.shape(sd[t]))}"
                 for t, _, shape in spec if t in sd and tuple(np.shape(sd[t])) != shape]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_fmt(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys ({len(unexpected)}): {_fmt(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatches ({len(bad_shape)}): {_fmt(bad_shape)}")
    if problems:
        raise ValueError(
            f"torchvision_to_flax: state dict does not match ResNet(stage_sizes="
            f"{tuple(stage_sizes)}, width={width}, bottleneck={bottleneck}): "
            + "; ".join(problems))
    out: dict[str, dict] = {"params": {}, "batch_stats": {}}
    for tkey, fpath, _ in spec:
        _set(out, fpath, _to_flax_array(sd[tkey]))
    return out


def _get(tree: Mapping, path: Sequence[str]) -> Any:
    for name in path:
        if not isinstance(tree, Mapping) or name not in tree:
            raise KeyError("/".join(path))
        tree = tree[name]
    return tree


def flax_to_torchvision(variables: Mapping[str, Any],
                        stage_sizes: Sequence[int] = (3, 4, 6, 3),
                        bottleneck: bool = True) -> dict[str, np.ndarray]:
    """Inverse of torchvision_to_flax: {'params','batch_stats'} -> torchvision state dict.

    Without fc.* and num_batches_tracked (load into torchvision with strict=False).
    """
    try:
        width = int(np.shape(_get(variables, ("params", "stem_conv", "kernel")))[-1])
    except KeyError as e:
        raise ValueError("flax_to_torchvision: variables have no params/stem_conv/kernel; "
                         "pass ResNet variables {'params': ..., 'batch_stats': ...}") from e
    out: dict[str, np.ndarray] = {}
    missing, bad_shape = [], []
    for tkey, fpath, shape in torchvision_spec(stage_sizes, bottleneck, width):
        try:
            value = np.asarray(_get(variables, fpath), dtype=np.float32)
        except KeyError:
            missing.append("/".join(fpath))
            continue
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        if value.shape != shape:
            bad_shape.append(f"{'/'.join(fpath)}: expected {shape} (torch layout), "
                             f"got {value.shape}")
            continue
        out[tkey] = np.ascontiguousarray(value)
    if missing or bad_shape:
        raise ValueError(
            f"flax_to_torchvision: variables do not match ResNet(stage_sizes="
            f"{tuple(stage_sizes)}, bottleneck={bottleneck}): missing {_fmt(missing)}; "
            f"shape mismatches {_fmt(bad_shape)}")
    return out


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state dict as {key: numpy array} from .safetensors, .npz or .pth/.pt.

    .pth/.pt need torch (not a project requirement); checkpoints wrapping the weights in
    'state_dict' or 'model' are unwrapped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_state_dict: no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return dict(load_file(path))
    if ext == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if ext in (".pth", ".pt"):
        try:
            import torch  # optional (not in requirements.txt): only .pth files need it
        except ImportError as e:
            raise ImportError(f"load_state_dict: reading {path} needs torch, which is not "
                              f"installed. {_CONVERT_HINT}") from e
        obj = torch.load(path, map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
        return {k: v.detach().cpu().numpy() for k, v in obj.items()
                if hasattr(v, "detach")}
    raise ValueError(f"load_state_dict: unsupported file type {ext!r} for {path} "
                     f"(use .safetensors, .npz, .pth or .pt)")


def save_state_dict(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Writes {key: numpy array} as .safetensors or .npz (by extension)."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in state_dict.items()}
    if ext == ".safetensors":
        save_file(arrays, path)
    elif ext == ".npz":
        np.savez(path, **arrays)
    else:
        raise ValueError(f"save_state_dict: unsupported file type {ext!r} for {path} "
                         f"(use .safetensors or .npz)")


def load_torchvision_resnet(path: str | os.PathLike,
                            stage_sizes: Sequence[int] = (3, 4, 6, 3),
                            bottleneck: bool = True, prefix: str = "",
                            strict: bool = True) -> dict[str, dict]:
    """File -> {'params', 'batch_stats'} for ResNet (load_state_dict + torchvision_to_flax)."""
    try:
        return torchvision_to_flax(load_state_dict(path), stage_sizes, bottleneck,
                                   prefix=prefix, strict=strict)
    except ValueError as e:
        raise ValueError(f"{os.fspath(path)}: {e}") from e
