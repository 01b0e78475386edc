"""
The log meter: what the training loop measures between two log lines, and the check that every
loss so far is finite.
"""
import contextlib
import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist

from nanotcmp.data import shapes
from nanotcmp.files import write_json
from nanotcmp.processes import all_reduce, print0, rank, world


class NonFiniteLoss(ArithmeticError):
    pass


class Meter:
    """The loop's bookkeeping: the loss and its parts summed over a log interval, the first
    non-finite loss, the steps' time (less the pauses to evaluate and save) and the share of it
    spent waiting for batches, padding shares and encoder shapes. The sums and the first non-finite
    loss stay on the device, so that a step never waits for them: they are read at log lines and
    saves."""

    def __init__(self, device, step, out, unit):
        """step: the steps done before (0, or where a resumed run continues); out: the run
        folder (log.json goes there); unit: what a step's items are ("windows" or "samples")"""
        self.device, self.out, self.unit, self.first_step, self.last_log = device, out, unit, step, step
        self.t0 = self.t_epoch = time.time()  # t_epoch: when the current epoch started
        self.first_bad = torch.full((), math.inf, device=device)  # the first step with a non-finite loss
        self.bad_parts = {}  # its loss's parts
        self.seen_shapes = {}  # modality -> the (rows, length) shapes its encoder has been called with
        self.new_interval()

    def new_interval(self):
        self.sums, self.pad, self.n_items, self.waited, self.paused = {}, {}, 0, 0.0, 0.0
        self.t_log = time.time()

    def fetch(self, batches):
        """-> the next step's micro-batches from the loader, counting the wait, items, padding and shapes"""
        t = time.time()
        n_items, micro = next(batches)
        self.waited += time.time() - t
        self.n_items += n_items
        for _, batch, counts in micro:
            for key, c in counts.items():
                self.pad[key] = self.pad.get(key, np.zeros(2)) + c
                self.seen_shapes.setdefault(key, set()).update(shapes(batch, key))
        return micro

    def add(self, step, loss, parts):
        """The loss of step `step` (counted from 1) and its parts, on the device"""
        fresh = torch.isinf(self.first_bad) & ~torch.isfinite(loss)  # this step's loss is the first bad one
        self.first_bad = torch.where(fresh, step, self.first_bad)
        self.bad_parts = {k: torch.where(fresh, v, self.bad_parts.get(k, v)) for k, v in parts.items()}
        for k, v in {"loss": loss, **parts}.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def check_finite(self):
        """Waits for the device; a non-finite loss so far stops the run, naming its step and the last good state"""
        bad = all_reduce(self.first_bad.clone(), dist.ReduceOp.MIN).item()
        if math.isfinite(bad):
            parts = ", ".join(f"{k} {v.item():.4g}" for k, v in self.bad_parts.items())
            where = f": {parts}" if world() == 1 else ""  # the parts are one process's share: shown when alone
            state = os.path.join(self.out, "state.pt")
            kept = f"the last good state is {state}" if os.path.isfile(state) else \
                "no state was saved before it (one is saved every --save-every steps and at each epoch's end)"
            raise NonFiniteLoss(f"non-finite loss at step {int(bad)}{where}; {kept}")

    @contextlib.contextmanager
    def pause(self, epoch_end):
        """Evaluating or saving: once the steps so far are done and finite, timed apart from them; at
        an epoch's end the next epoch starts after it"""
        self.check_finite()
        t = time.time()
        yield
        self.paused += time.time() - t
        if epoch_end:
            self.t_epoch = time.time()

    def log(self, progress, total):
        """The interval's log line, printed, and its record (means over its steps and the processes)
        added to the history and log.json"""
        self.check_finite()  # waits for the device: the time below is the steps', not their dispatch's
        step = progress.step
        n = step - self.last_log
        means = {k: all_reduce(v / n).item() for k, v in self.sums.items()}
        dt = (time.time() - self.t_log - self.paused) / n
        shares = {k: float(c[0] / c[1]) for k, c in
                  ((k, all_reduce(torch.tensor(v, device=self.device))) for k, v in self.pad.items())}
        wait = self.waited / (dt * n)  # the share of the steps' time spent waiting for a batch
        n_shapes = {k: len(v) for k, v in self.seen_shapes.items()}  # (this process's)
        print0(f"step {step}/{total} | loss {means['loss']:.4f} ("
               + ", ".join(f"{k} {v:.4f}" for k, v in means.items() if k != "loss")
               + f") | {dt * 1000:.0f} ms/step | {self.n_items / (dt * n):.1f} {self.unit}/s | waits {wait:.0%}"
               + "".join(f" | padding {k} {v:.0%}" for k, v in shares.items())
               + "".join(f" | {k} shapes {v}" for k, v in n_shapes.items())
               + f" | ETA {(total - step) * (time.time() - self.t0) / (step - self.first_step) / 60:.1f} min")
        progress.history.append({"step": step, **means, "ms_per_step": dt * 1000, "padding": shares, "wait": wait,
                                 "shapes": n_shapes})
        if rank() == 0:
            write_json(os.path.join(self.out, "log.json"), progress.history)
        self.last_log = step
        self.new_interval()
