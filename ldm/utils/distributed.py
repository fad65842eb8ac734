"""Whether collectives are needed: one definition for modules, metrics and callbacks."""

import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised torch.distributed process group of more than one process (DDP);
    single-process runs skip collectives."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
