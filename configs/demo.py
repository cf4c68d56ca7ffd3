"""Built-in demo (`make demo`). Until the zero-shot demo lands it runs the toy stage: a
sharded MLP trained through the shared loop with checkpoints, metrics and resume."""
from configs import toy


def get_config():
    return toy.get_config()
