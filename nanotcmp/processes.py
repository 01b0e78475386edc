"""
Processes and the device. A run is one process, or one per GPU (or CPU share) under torchrun;
a process's rank and the world size are read from the process group torchrun's environment
starts, never kept in globals of our own. On a device the model runs in one precision (autocast).
"""
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def device_from(name, script):
    """--device auto | cpu | cuda[:N] -> torch.device, or the script's one-line error"""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SystemExit(f"{script}: --device {name}: not a device (auto, cpu or cuda)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{script}: --device {name}: this machine has no CUDA device torch can use")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"{script}: --device {name}: only cpu and cuda are supported")
    return device


def start(device):
    """Join the process group when started by torchrun (WORLD_SIZE > 1) -> this process's device:
    its own GPU, one per process"""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        # the others wait while the first process fills the feature cache and evaluates
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
    set_up_device(device)
    return device


def stop():
    if dist.is_initialized():
        dist.destroy_process_group()


def set_up_device(device):
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # cuDNN's attention builds a plan for every new shape: 25 ms a call on an H100, more than a
        # tiny model's whole step; the other attention kernels need none
        torch.backends.cuda.enable_cudnn_sdp(False)
    else:
        # oneDNN prepares a kernel for every new convolution shape, and length buckets bring new
        # shapes every step: torch's own convolutions are faster here (bench.py train)
        torch.backends.mkldnn.enabled = False


def autocast(device):
    """The precision the model runs in: bf16 on CUDA (float32 weights, bf16 matrix products),
    float32 elsewhere. No cast cache, so that the model can be captured as CUDA graphs (cuda_graphs.py)."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def print0(*args, **kwargs):
    if rank() == 0:
        print(*args, **kwargs)


def all_reduce(x, op=dist.ReduceOp.SUM):
    if world() > 1:
        dist.all_reduce(x, op)
    return x


def broadcast(obj):
    """-> the first process's obj, in every process"""
    if world() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        obj = box[0]
    return obj


def gather(obj):
    """-> [each process's obj], in every process"""
    objs = [obj] * world()
    if world() > 1:
        dist.all_gather_object(objs, obj)
    return objs


def barrier():
    if world() > 1:
        dist.barrier()
