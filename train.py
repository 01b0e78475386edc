"""
Train TCMP: contrastive pre-training on dialogues (target utterance searching + text-audio
consistency), then fine-tuning to pre-recognise the next emotion.

python train.py                      # both stages on the demo with tiny encoders: a few minutes on a CPU
python train.py --stage pretrain --data data/meld-unlabelled \\
    --text-encoder weights/bert-base-uncased --audio-encoder weights/hubert-base-ls960
python train.py --stage finetune --data data/p-meld --init out/meld-unlabelled-pretrain \\
    --text-encoder weights/bert-base-uncased --audio-encoder weights/hubert-base-ls960
python train.py ... --freeze-encoders  # encode every utterance once, train only the TCMP layers
torchrun --nproc_per_node=4 train.py ...  # one process per GPU; --batch-size is the global batch

The defaults come from a preset of nanotcmp/settings.py (the demo, frozen checkpoints or the paper),
chosen from the encoders; every option given replaces the preset's value.
"""
import functools
import os
import sys
import time

from torch.nn.parallel import DistributedDataParallel as DDP

from nanotcmp import processes, settings
from nanotcmp.checkpoint import claim_folders, interrupted, load_kept, run_folder, save_model, save_state
from nanotcmp.data import load_meta, to_device
from nanotcmp.evaluate import describe, evaluate, final_scores, selection_score
from nanotcmp.files import one_line_errors, write_json
from nanotcmp.loader import ahead, step_batches, steps_per_epoch
from nanotcmp.meter import Meter, NonFiniteLoss
from nanotcmp.processes import barrier, broadcast, print0, rank, world
from nanotcmp.training import open_splits, optimizer, set_rates, set_up_model, train_step


def main(argv=None):
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = settings.parse_args(argv, __doc__)
    stages = []  # the settings of each stage: pre-training, fine-tuning or both
    try:
        with one_line_errors("train.py", lambda: interrupted(stages, argv), (NonFiniteLoss,)):
            device = processes.start(args.device)  # under torchrun: this process's GPU
            stages += settings.plan(args, device)
            claim_folders(stages)  # before anything is trained: no folder holds an old run beside a new one
            for s in stages:
                if train(s, device) is None:  # stopped by --max-steps
                    return None
            return stages[-1].out
    finally:
        processes.stop()


def train(s, device):
    """One stage with its settings s -> its run folder (None when stopped by --max-steps)"""
    print0(settings.as_line(s))
    # the data: windows of dialogues (pre-training) or samples (fine-tuning), memory-mapped
    meta = load_meta(s.data)
    train_split, items, dev, test = open_splits(s, meta)
    # the model and its optimiser
    model = set_up_model(s, meta, (train_split, dev, test), device)
    opt = optimizer(model, s)
    # each stage leaves parameters unused (the emotion head in pre-training, TUS and CLIP's in fine-tuning)
    runner = DDP(model, find_unused_parameters=True) if world() > 1 else model
    per_epoch = steps_per_epoch(s, items, train_split)
    total, unit = s.epochs * per_epoch, "windows" if s.stage == "pretrain" else "samples"
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"{s.stage}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters ({n_trained / 1e6:.2f} M "
           f"trained), {len(items)} {unit}, {s.epochs} epochs of {per_epoch} steps, {device}"
           + (f" x {world()} processes" if world() > 1 else ""))
    with run_folder(s, meta, model, opt, device, total, per_epoch) as progress:  # new, or resumed from its state.pt
        if progress is None:  # (resumed, it was done)
            return s.out
        meter = Meter(device, progress.step, s.out, unit)
        make = functools.partial(step_batches, s, items, train_split, model.config.modalities, per_epoch)
        batches = iter(ahead(make, total, s.workers, progress.step))  # built ahead by worker processes
        while not progress.finished(total, per_epoch, s.patience):  # a step
            micro = meter.fetch(batches)  # this process's micro-batches of the step
            set_rates(opt, s, progress.step, total)
            loss, parts = train_step(runner, opt, [(share, to_device(batch, device)) for share, batch, _ in micro])
            progress.step += 1
            meter.add(progress.step, loss, parts)
            if progress.step % s.log_every == 0 or progress.step == total:
                meter.log(progress, total)  # a log line
            epoch_end = progress.step % per_epoch == 0
            stop = bool(s.max_steps) and s.max_steps <= progress.step < total
            if epoch_end or stop or progress.step % s.save_every == 0:
                with meter.pause(epoch_end):  # (checks that every loss so far is finite)
                    if epoch_end:
                        end_epoch(s, progress.step // per_epoch, progress, model, dev, meta, device, meter.t_epoch)
                    save_state(os.path.join(s.out, "state.pt"), model, opt, progress, device)  # for --resume
            if stop:
                print0(f"stopped at step {progress.step} (--max-steps); continue with --resume")
                return None
        if progress.step < total:
            print0(f"stopped after epoch {progress.step // per_epoch}: dev has not improved for {s.patience} epochs")
    if rank() == 0:  # the kept model on test, beside the references
        load_kept(model, s.out)
        report = final_scores(model, s, progress, (train_split, dev, test), len(items), meta["labels"], device)
        write_json(os.path.join(s.out, "metrics.json"), report)
        print(f"{s.stage} done in {time.time() - meter.t0:.0f} s: {s.out}")
    barrier()
    return s.out


def end_epoch(s, epoch, progress, model, dev, meta, device, t_start):
    """The first process evaluates on dev and keeps the model if it is the best so far; t_start:
    when the epoch started"""
    if rank() == 0:
        scores = evaluate(model, dev, s, device)
        print(f"epoch {epoch} ({time.time() - t_start:.0f} s) dev: {describe(scores)}")
        progress.dev_by_epoch.append(scores)
        if progress.best is None or selection_score(scores, s.tus) > selection_score(progress.best["dev"], s.tus):
            progress.best = {"epoch": epoch, "dev": progress.dev_by_epoch[-1]}
            save_model(model, s.out, s.stage, meta, s.data)
    progress.best = broadcast(progress.best)


if __name__ == "__main__":
    main()
