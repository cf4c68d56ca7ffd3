"""Config blocks shared by every experiment config: mesh, distributed runtime, debug hooks."""
import ml_collections


def base_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.stages = ()
    # Device mesh: ('data', 'model'); -1 = inferred from the device count.
    cfg.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
    # Multi-host: jax.distributed.initialize() when enabled (or EZSD_DISTRIBUTED=1).
    cfg.distributed = ml_collections.ConfigDict(dict(
        enabled=False, coordinator_address="", num_processes=-1, process_id=-1))
    # Fault injection for resume tests: SIGKILL after this step (-1: never).
    cfg.debug = ml_collections.ConfigDict(dict(kill_at_step=-1, kill_during_save=False))
    return cfg
