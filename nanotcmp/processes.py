"""
Processes and the device. A run is one process, or one per GPU (or CPU share) under torchrun;
a process's rank and the world size are read from the process group torchrun's environment
starts, never kept in globals of our own. On a device the model runs in one precision (autocast).
"""
import os
import socket
import sys
import time
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


JOIN_SECONDS = 300  # how long processes started by hand with torchrun's variables wait for each other


def start(device):
    """Join the process group when started by torchrun (WORLD_SIZE > 1) -> this process's device:
    its own GPU, one per process"""
    n = torchrun_world()
    if n > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            if device.index >= torch.cuda.device_count():
                raise SystemExit(f"train.py: LOCAL_RANK={device.index}, but this machine has "
                                 f"{torch.cuda.device_count()} GPUs: start at most one process a GPU")
            torch.cuda.set_device(device)
        # the others wait while the first process fills the feature cache and evaluates
        backend, timeout = "nccl" if device.type == "cuda" else "gloo", timedelta(hours=2)
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun started every process: they meet at once
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=meet(n), rank=int(os.environ["RANK"]), world_size=n, timeout=timeout)
    set_up_device(device)
    return device


def torchrun_world():
    """The number of processes torchrun's variables say, checked: all of them there, as numbers"""
    n = os.environ.get("WORLD_SIZE", "1")
    if not n.isdigit():
        raise SystemExit(f"train.py: WORLD_SIZE={n} is not a number of processes: unset it, or start with torchrun")
    if int(n) > 1:
        names = ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        if missing := [v for v in names if not os.environ.get(v)]:
            raise SystemExit(f"train.py: WORLD_SIZE={n} is set but not {', '.join(missing)}: these are torchrun's "
                             f"variables; start with torchrun --nproc_per_node={n} train.py ..., or unset WORLD_SIZE")
        below = {"RANK": int(n), "LOCAL_RANK": int(n), "MASTER_PORT": 65536}  # (a port is 1 to 65535)
        if bad := [v for v in below if not os.environ[v].isdigit() or int(os.environ[v]) >= below[v]]:
            raise SystemExit(f"train.py: {bad[0]}={os.environ[bad[0]]} is not a number below "
                             f"{f'WORLD_SIZE={n}' if bad[0] != 'MASTER_PORT' else 65536}: start with torchrun")
    return int(n)


def meet(n):
    """The processes' meeting point when torchrun's variables were set by hand (or left in a shell):
    the first process holds it, the others connect; each waits JOIN_SECONDS at most, saying so"""
    host, port, me = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["RANK"])
    print(f"train.py: process {me} of {n} (RANK, WORLD_SIZE): waiting up to {JOIN_SECONDS} s for the others at "
          f"{host}:{port} (MASTER_ADDR, MASTER_PORT)", file=sys.stderr, flush=True)
    wait, deadline = timedelta(seconds=JOIN_SECONDS), time.monotonic() + JOIN_SECONDS
    if me == 0:  # holds the meeting point
        try:
            store = dist.TCPStore(host, port, n, is_master=True, timeout=wait, wait_for_workers=False)
        except dist.DistNetworkError as e:  # (the port taken, say)
            raise SystemExit(f"train.py: cannot hold the meeting point {host}:{port} (MASTER_ADDR, MASTER_PORT): "
                             f"{str(e).splitlines()[0]}; choose another MASTER_PORT") from None
    try:
        if me != 0:
            while not reachable(host, port):  # (torch's own connecting would log every failed try)
                if time.monotonic() > deadline:
                    raise dist.DistError("nothing answers there")
                time.sleep(0.5)
            store = dist.TCPStore(host, port, n, is_master=False, timeout=wait)
        store.add("met", 1)
        while (met := store.add("met", 0)) < n:  # every process waits for all of them
            if time.monotonic() > deadline:
                raise dist.DistError(f"{met} of them came")
            time.sleep(0.2)
            if me != 0 and not reachable(host, port):  # (asking a store that is gone logs a stack)
                raise dist.DistError("the first process gave up")
    except dist.DistError as e:
        raise SystemExit(f"train.py: the {n} processes of WORLD_SIZE={n} did not all meet at {host}:{port} within "
                         f"{JOIN_SECONDS} s ({str(e).splitlines()[0]}): start them all with torchrun, or unset "
                         f"WORLD_SIZE to train in one process") from None
    store.set_timeout(timedelta(hours=2))
    return store


def reachable(host, port):
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


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
