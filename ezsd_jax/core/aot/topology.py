"""Accelerator slices for deviceless compilation: a slice name -> compile-only devices (from
libtpu's topology descriptions; no TPU needed) and the chip's HBM, peak bf16 FLOP/s and HBM
bandwidth (the vendor's published figures, used for the capacity check and the estimates).
"""
from __future__ import annotations

import dataclasses
import os
import re

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: int          # per chip (per device of the topology)
    peak_flops: float       # bf16 dense, per chip
    hbm_bw: float           # bytes/s, per chip


# Cloud TPU system architecture pages (per chip); v4/v5p run as megacore (1 device a chip).
CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1228e9),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9),
    # H100 SXM 80 GB: 989 TFLOP/s dense bf16, 3.35 TB/s; the compiler sees 79.1 GiB
    "h100": Chip("NVIDIA H100 80GB", 84929347584, 989e12, 3352e9),
    # H200 SXM 141 GB: the H100's 989 TFLOP/s dense bf16, 4.8 TB/s
    "h200": Chip("NVIDIA H200", 141 * 10 ** 9, 989e12, 4800e9),
}


def chip_of_device(device) -> Chip | None:
    """The Chip of a real jax device from its device_kind ('NVIDIA H100 80GB HBM3',
    'TPU v5 lite', ...); None where the project has no published figures (e.g. CPU)."""
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, chip in (("h200", CHIPS["h200"]), ("h100", CHIPS["h100"]),
                      ("v5 lite", CHIPS["v5e"]), ("v5e", CHIPS["v5e"]),
                      ("v5p", CHIPS["v5p"]), ("v6", CHIPS["v6e"]), ("v4", CHIPS["v4"])):
        if key in kind:
            return chip
    return None

# XLA's GPU target description of an H100 SXM (deviceless compilation; docs/aot.md)
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: 3352320000000 l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: 84929347584 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
dnn_version_info { major: 9 minor: 7 }
runtime_version { major: 12 minor: 8 patch: 0 }
device_description_str: "NVIDIA H100 80GB HBM3"
"""

# Cloud accelerator types -> topology (v4/v5p count TensorCores: 2 a chip; v5e/v6e chips)
ALIASES = {
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4",
    "v5p-64": "v5p:2x4x4",
    "v5litepod-4": "v5e:2x2", "v5litepod-8": "v5e:2x4", "v5litepod-16": "v5e:4x4",
    "v5litepod-32": "v5e:4x8", "v5litepod-64": "v5e:8x8", "v5litepod-256": "v5e:16x16",
    "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8",
    "v5e-64": "v5e:8x8", "v5e-256": "v5e:16x16",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8",
}


@dataclasses.dataclass
class Slice:
    name: str               # canonical 'gen:AxB[xC]'
    chip: Chip
    devices: list           # compile-only jax devices, one per chip

    @property
    def num_chips(self) -> int:
        return len(self.devices)

    @property
    def num_hosts(self) -> int:
        return len({d.process_index for d in self.devices})


class TopologyError(ValueError):
    """A slice name this tool does not know (reported as one line)."""


def canonical(name: str) -> str:
    """'v5e-8' / 'v5litepod-8' / 'v5e:2x4' -> 'v5e:2x4'; unknown -> TopologyError."""
    name = ALIASES.get(name.strip(), name.strip())
    if not (re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})", name)
            or re.fullmatch(r"h100:[1-8]", name)):
        raise TopologyError(f"--topology={name!r}: expected a slice like v5e:2x2, v4:2x2x2, "
                            f"v5p:2x2x4, h100:8 or an accelerator type "
                            f"({', '.join(sorted(ALIASES))})")
    return name


def get_slice(name: str) -> Slice:
    """Compile-only devices of the slice (one per chip; v4 and v5p as megacore)."""
    name = canonical(name)
    gen = name.split(":")[0]
    if gen == "h100":
        return _gpu_slice(name)
    # compile-only use: several checks (and tests) may load libtpu at once; without this
    # libtpu refuses a second process (and a stale /tmp/libtpu_lockfile blocks every one)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        from jax.experimental import topologies
        kw = {"chip_config_name": "megacore"} if gen in ("v4", "v5p") else {}
        topo = topologies.get_topology_desc(topology_name=name, platform="tpu", **kw)
    except Exception as e:  # noqa: BLE001 -- libtpu absent or the name rejected
        raise TopologyError(f"--topology={name}: no compile-only TPU devices ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}); install libtpu with "
                            "pip install -r requirements-tpu.txt") from None
    return Slice(name, CHIPS[gen], list(topo.devices))


def _gpu_slice(name: str) -> Slice:
    """N H100s of one host, deviceless: jax's CUDA plugin (jax-cuda12-plugin and -pjrt of
    the same version, no CUDA libraries) with XLA's H100 target description."""
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")   # no CUDA runtime here
    n = int(name.split(":")[1])
    try:
        from jax.experimental import topologies
        topo = topologies.get_topology_desc(platform="cuda", target_config=H100_TARGET,
                                            topology=f"1x1x{n}")
    except Exception as e:  # noqa: BLE001 -- plugin absent or too old
        raise TopologyError(f"--topology={name}: no compile-only GPU devices ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:300]}); install the CUDA plugin with "
                            'pip install "jax-cuda12-plugin==0.10.2" "jax-cuda12-pjrt==0.10.2" '
                            "(docs/aot.md)") from None
    return Slice(name, CHIPS["h100"], list(topo.devices))


def libtpu_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None
