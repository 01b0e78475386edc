"""
Checkpoints and --resume. A run folder holds the kept model (model.safetensors, with config.json
for sample.py and fine-tuning's --init) and state.pt, the state --resume continues from: the
model, the optimiser, the random states and the run's Progress.
"""
import os
from dataclasses import asdict, dataclass, field

import torch
from safetensors.torch import save_file

from nanotcmp.data import DataError, load_run, write_atomic, write_json
from nanotcmp.processes import barrier, gather, print0, rank, world


def save_model(model, out, stage, meta, data):
    """The kept model into the run folder out: model.safetensors, and config.json for sample.py and
    fine-tuning's --init; meta, data: the dataset's meta.json and folder"""
    write_atomic(os.path.join(out, "model.safetensors"),
                 lambda p: save_file({k: v.contiguous() for k, v in model.state_dict().items()}, p))
    config = {"stage": stage, "model": asdict(model.config), "labels": meta["labels"],
              "vocab": {**meta["vocab"], "path": os.path.abspath(os.path.join(data, meta["vocab"]["path"]))},
              "max_tokens": meta["settings"]["max_tokens"], "max_context": meta["settings"]["max_context"],
              "data": os.path.abspath(data)}
    write_json(os.path.join(out, "config.json"), config)


def load_init(model, folder, meta):
    """Start fine-tuning from a pre-training run of the same vocabulary: every tensor but the
    emotion head must fit."""
    try:
        config, ckpt = load_run(folder)
    except DataError as e:
        raise DataError(f"--init: {e}") from None
    if config["vocab"]["sha256"] != meta["vocab"]["sha256"]:
        raise DataError(f"--init {folder} was trained with the vocabulary {config['vocab']['path']}, "
                         f"the dataset is prepared with another ({meta['vocab']['path']}): their ids differ")
    path, state = os.path.join(folder, "model.safetensors"), model.state_dict()
    wanted = [n for n in state if not n.startswith(("head1.", "head2."))]
    bad = [f"{n}: model {tuple(state[n].shape)}, checkpoint "
           f"{tuple(ckpt[n].shape) if n in ckpt else 'missing'}" for n in wanted
           if n not in ckpt or ckpt[n].shape != state[n].shape]
    if bad:
        raise DataError(f"--init {path} does not fit this model:\n  " + "\n  ".join(bad))
    model.load_state_dict({n: ckpt[n] for n in wanted}, strict=False)


@dataclass
class Progress:
    """Where a run is: saved in state.pt with the model, the optimiser and the random states"""
    step: int = 0  # steps done
    best: dict | None = None  # the kept model's epoch and dev scores
    history: list = field(default_factory=list)  # log.json: a record every --log-every steps
    dev_by_epoch: list = field(default_factory=list)


def save_state(path, model, opt, progress, device):
    """state.pt, which --resume continues from, with every process's random state (dropout's)"""
    rngs = gather((torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
    if rank() == 0:
        write_atomic(path, lambda p: torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                                                 **asdict(progress), "rng": rngs}, p))
    barrier()


def resume(path, model, opt, device):
    """--resume: the model, the optimiser and this process's random state from state.pt -> its Progress"""
    if not os.path.isfile(path):
        raise DataError(f"--resume: no {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        missing = [k for k in ("model", "opt", "step", "best", "history", "rng") if k not in state]
    except Exception as e:  # torch.load raises what the unpickler meets: EOFError, UnpicklingError, ...
        raise DataError(f"--resume: {path} is unreadable or incomplete "
                         f"({type(e).__name__}); start again without --resume") from None
    if missing:
        raise DataError(f"--resume: {path} has no {', '.join(missing)}: not a state of train.py")
    if len(state["rng"]) != world():
        raise DataError(f"--resume: {path} was saved by {len(state['rng'])} processes, "
                         f"this run has {world()}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    cpu_rng, cuda_rng = state["rng"][rank()]
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    print0(f"resumed at step {state['step']}")
    # (a state saved before train.py kept the dev scores of every epoch has none)
    return Progress(state["step"], state["best"], state["history"], state.get("dev_by_epoch", []))
