"""Running Megatron-Core's group-reducing helpers on one CPU process (see PEERS.md)."""
import os
import socket

import torch.distributed as dist
from megatron.core import parallel_state


def init_one_rank():
    """A one-rank Gloo group on a free port and Megatron's parallel state with TP = PP = EP = 1.
    Returns the tensor-parallel group (what Megatron's loss helpers reduce over)."""
    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    return parallel_state.get_tensor_model_parallel_group()
