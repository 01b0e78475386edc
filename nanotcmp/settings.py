"""
train.py's settings, decided here and nowhere else: its options, and the presets that give the
defaults of the ones a command leaves out. A run's preset follows from its encoders (or --preset
names one). Each stage of the run gets its settings as one object, s: the options by their names
(s.batch_size is --batch-size), each left-out one with its preset's value, printed when the stage
starts.
"""
import argparse
import math
import os

from nanotcmp.files import given_path
from nanotcmp.processes import device_from, print0, world

def ranged(kind, low=None, high=None, above=False, below=False):
    """An argparse type: a number of kind (int or float) within [low, high], or (low, ... when above,
    ..., high) when below; argparse names the option in its error"""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(x) or (low is not None and (x < low or above and x == low)) or \
                (high is not None and (x > high or below and x == high)):
            interval = (f"{'(' if above else '['}{'-inf' if low is None else low}, "
                        f"{'inf' if high is None else high}{')' if below or high is None else ']'}")
            raise argparse.ArgumentTypeError(f"{text} is outside {interval}")
        return x
    return parse


def one_of(*names):
    """An argparse type: one of names (a choice a preset can give)"""
    def parse(text):
        if text not in names:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(names)}")
        return text
    return parse


SEED = ranged(int, 0, 2 ** 32 - 1)  # an argparse type: a seed, as torch and numpy take it (and seed + rank)

# A value that is a dict depends on the stage ("pretrain", "finetune"), then on the device ("cuda", "cpu").
PRESETS = {
    # both encoders tiny and random (--text-encoder tiny --audio-encoder tiny): the demo, from scratch
    "demo": dict(
        d=64,  # as wide as the tiny encoders
        dropout=0.1,  # the paper's
        k=5,  # candidates a target (1 true + 4 noise): tiny encoders retrieve better so (docs/speed.md, "Batch sizes")
        batch_size={"pretrain": 4,  # windows a step: tiny encoders learn by their number of steps (same section)
                    "finetune": {"cuda": 64, "cpu": 16}},  # samples a step: 16 on a CPU keeps a step short
        epochs={"pretrain": 3,  # of the demo's 200 unlabelled dialogues: its dev retrieval is best by then
                "finetune": 12},  # at most: patience stops it earlier
        patience={"pretrain": 0,  # every epoch
                  "finetune": 3},  # on 20 labelled dialogues a pre-trained model is best after an epoch or two
        lr=1e-3,  # everything learns from scratch, with larger steps than a checkpoint's fine-tuning
        lr_encoder=None,  # --lr's: the tiny encoders learn from scratch too
        lr_schedule="constant",
        context_emotions=0.0,
    ),
    # checkpoints kept fixed (--freeze-encoders): only the TCMP layers learn, from a few thousand samples;
    # chosen on P-MELD's dev split over 3 seeds (docs/results.md, "How the settings were chosen")
    "frozen": dict(
        d=128,  # the paper's 768 (10 M parameters) fits the training samples within a few epochs
        dropout=0.1,  # both stages, so that --init fits
        k=11,  # the authors' code
        batch_size=64,  # the authors' 64 windows; 64 samples, as fine-tuning's rate was chosen with
        epochs=8,  # pre-training: the paper's; fine-tuning: the best dev epoch count
        patience=0,  # every epoch
        lr={"pretrain": 2e-4, "finetune": 1e-4},  # the best mean dev recall (the paper's); the best mean dev macro-F1
        lr_encoder=2e-6,  # the paper's (the encoders do not learn: unused)
        lr_schedule="constant",
        context_emotions=0.0,
    ),
    # checkpoints trained end to end: the paper's settings (§4.2)
    "paper": dict(
        d=768,  # BERT-base's and HuBERT-base's width
        dropout=0.1,
        k=11,  # the authors' code
        batch_size={"pretrain": 64,  # windows, the authors' (in micro-batches of at most 16 windows)
                    "finetune": {"cuda": 64, "cpu": 16}},  # samples: 16 on a CPU, whose memory is the limit
        epochs={"pretrain": 8, "finetune": 12},
        patience=0,  # every epoch
        lr={"pretrain": 2e-4, "finetune": 2e-5},  # everything but the encoders
        lr_encoder=2e-6,  # the encoders, fine-tuned gently
        lr_schedule="constant",
        context_emotions=0.0,  # the paper's loss alone
    ),
}
# the options a preset gives: their type (and range) and what they set
PRESET_OPTIONS = {"d": (ranged(int, 1), "model width"),
                  "dropout": (ranged(float, 0, 1, below=True), "dropout of the TCMP layers"),
                  "k": (ranged(int, 2), "candidates a target in pre-training: 1 true + k-1 noise"),
                  "batch_size": (ranged(int, 1), "windows (pre-training) or samples (fine-tuning) a step"),
                  "epochs": (ranged(int, 1), "epochs of a stage, at most"),
                  "patience": (ranged(int, 0), "stop a stage after this many epochs without a better dev score "
                                                "(0: never)"),
                  "lr": (ranged(float, 0), "everything but the encoders"),
                  "lr_encoder": (ranged(float, 0), "the encoders"),
                  "lr_schedule": (one_of("constant", "cosine"), "the rates through a stage: constant, or cosine (from "
                                                               "--lr and --lr-encoder down to 0 at the last epoch)"),
                  "context_emotions": (ranged(float, 0), "fine-tuning: the weight, beside Eq. 23's loss, of a loss "
                                                         "that recognises each labelled context utterance's emotion "
                                                         "(0: none, as the paper)")}
# how fast a run goes, the same in every preset
SPEED = dict(
    shape_grid={"cuda": True, "cpu": False},  # a GPU plans each encoder shape once; on the CPU a grid only pads
    workers={"cuda": 4, "cpu": 0},  # processes building batches ahead; on the CPU they would take its cores
)
MICRO_WINDOWS = 16  # a pre-training micro-batch holds at most this many windows; more are accumulated
# the tiny encoders' sizes (the demo's, and the tests')
TINY_BERT = dict(dim=64, n_layer=2, n_head=2, ffn_dim=128, max_positions=128)
TINY_HUBERT = dict(dim=64, n_layer=2, n_head=2, ffn_dim=128, conv_dim=(16,) * 7, pos_kernel=16, pos_groups=4,
                   normalize_wave=True)
STAGES = ("pretrain", "finetune")


# what a run's results do not depend on: --resume may change these
HOW_TO_RUN = ("stage", "preset", "out", "workers", "device", "resume", "overwrite", "max_steps", "log_every",
              "save_every", "compile", "cuda_graphs", "no_cache")


def by_preset(key):
    """A setting's values in the presets, as a help string shows them"""
    def show(v):
        if isinstance(v, dict):
            return ", ".join(f"{k} {show(x)}" for k, x in v.items())
        return "--lr's" if v is None else v if isinstance(v, str) else f"{v:g}"
    return "; ".join(f"{name}: {show(p[key])}" for name, p in PRESETS.items())


def parse_args(argv, description):
    """train.py's command line -> argparse's namespace (device: a torch.device), the options checked"""
    args = options(description).parse_args(argv)
    args.device = device_from(args.device, "train.py")  # a device this machine lacks is named first
    if args.compile and args.cuda_graphs == "all":
        raise SystemExit("train.py: --compile and --cuda-graphs all both take the encoders: choose one")
    if args.resume and args.overwrite:
        raise SystemExit("train.py: --resume continues the run in --out, --overwrite replaces it: choose one")
    if args.train_fraction < 1 and args.stage == "pretrain":
        raise SystemExit("train.py: --train-fraction is a share of the labelled dialogues, for --stage finetune or all")
    if args.tus == "inter" and args.modalities != "all" and args.stage != "finetune":
        raise SystemExit(f"train.py: --tus inter trains the fused retrieval (M2M), which needs text and audio: use "
                         f"--tus intra with --modalities {args.modalities}")
    if args.fixed_layers and (args.freeze_encoders or args.modalities == "audio"):
        raise SystemExit("train.py: --fixed-layers keeps the text encoder's lower layers fixed while the layers above "
                         f"train: {'--freeze-encoders fixes them all' if args.freeze_encoders else 'it needs text'}")
    if args.init and args.stage != "finetune":
        raise SystemExit(f"train.py: --init is for --stage finetune (--stage {args.stage} "
                         f"{'fine-tunes from its own pre-training' if args.stage == 'all' else 'starts from scratch'})")
    return args


def options(description):
    """train.py's options: a preset gives the default of those without one here"""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["pretrain", "finetune", "all"], default="all")
    p.add_argument("--data", type=given_path, default="data/demo", help="a dataset made by prepare.py")
    p.add_argument("--text-encoder", type=given_path, default="tiny",
                   help="a BERT checkpoint folder, or 'tiny' (random, small)")
    p.add_argument("--audio-encoder", type=given_path, default="tiny", help="a HuBERT checkpoint folder, or 'tiny'")
    p.add_argument("--modalities", choices=["text", "audio", "all"], default="all")
    p.add_argument("--preset", choices=list(PRESETS), help="the defaults of the options below (default: demo with "
                   "both encoders tiny, else frozen with --freeze-encoders, else paper)")
    p.add_argument("--init", type=given_path, help="fine-tune from this pre-training run's folder")
    p.add_argument("--out", type=given_path,
                   help="default: out/<data>-<stage>; with --stage all, OUT/pretrain and OUT/finetune")
    for key, (kind, what) in PRESET_OPTIONS.items():
        p.add_argument("--" + key.replace("_", "-"), type=kind, help=f"{what} (default: {by_preset(key)})")
    p.add_argument("--encoder-dropout", type=ranged(float, 0, 1, below=True),
                   help="dropout inside BERT and HuBERT (default: the checkpoint's, 0.1 for tiny ones)")
    p.add_argument("--max-steps", type=ranged(int, 1), help="stop (with a resumable state) after this many steps")
    p.add_argument("--no-distant", action="store_true", help="see only the nearby context (w/o Dist)")
    p.add_argument("--tus", choices=["intra", "inter", "both"], default="both")
    p.add_argument("--tus-loss", choices=["bce", "softmax"], default="bce")
    p.add_argument("--train-fraction", type=ranged(float, 0, 1, above=True), default=1.0,
                   help="fine-tune on this share of the training dialogues, drawn by --seed (dev and test stay whole)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last state (with --stage "
                   "all: whichever stage it stopped in)")
    p.add_argument("--overwrite", action="store_true", help="replace the run --out holds (without it, a new run into "
                   "a run's folder is refused)")
    p.add_argument("--max-padding", type=ranged(float, 0, 1), default=0.1,
                   help="length buckets: padding share each encoder batch may have (1: one padded batch)")
    p.add_argument("--shape-grid", choices=["on", "off"], help="pad the encoder batches to shapes of a fixed grid, "
                   "which a GPU plans once each (default: on with CUDA, off on the CPU, where it only pads)")
    p.add_argument("--micro-batches", type=ranged(int, 1), help="a step's batch is split into these, each with its own "
                   "noise candidates and CLIP negatives; more of them than processes accumulate gradients (default: "
                   f"one a process, or more to keep each within {MICRO_WINDOWS} windows)")
    p.add_argument("--freeze-encoders", action="store_true", help="keep BERT and HuBERT fixed: their pooled outputs "
                   "are computed once and cached beside the dataset")
    p.add_argument("--no-cache", action="store_true", help="with --freeze-encoders: run the encoders every step")
    p.add_argument("--fixed-layers", type=ranged(int, 0), default=0, help="train the text encoder's layers above "
                   "its first N only: the embeddings and those N stay fixed, their outputs computed once for every "
                   "token and kept beside the dataset (default 0: every layer trains, as the paper)")
    p.add_argument("--compile", action="store_true", help="torch.compile the encoders")
    p.add_argument("--cuda-graphs", choices=["off", "context", "all"], default="context", help="on CUDA, run the "
                   "context interactions (with 'all' the encoders too) as CUDA graphs, one a shape, each keeping its "
                   "activations' memory: 'all' suits encoders of MiniLM's size or smaller (default: context)")
    p.add_argument("--workers", type=ranged(int, 0), help="processes building batches ahead (default: 4 on CUDA, 0 "
                   "on the CPU, where they would take its cores)")
    p.add_argument("--log-every", type=ranged(int, 1), default=10)
    p.add_argument("--save-every", type=ranged(int, 1), default=50, help="steps between resumable states")
    return p


def plan(args, device):
    """-> the settings of each stage --stage runs: one, or pre-training then fine-tuning from it"""
    if args.stage != "all":
        return [stage_settings(args.stage, args, device, args.out, args.init, args.batch_size)]
    out = {stage: args.out and os.path.join(args.out, stage) for stage in STAGES}
    pretrain = stage_settings("pretrain", args, device, out["pretrain"], None, args.batch_size)
    finetune = stage_settings("finetune", args, device, out["finetune"], pretrain.out, None)  # its default batch
    if not os.path.isfile(os.path.join(pretrain.out, "metrics.json")):  # pre-training to do: fine-tune after it
        finetune.overwrite, finetune.resume = finetune.overwrite or finetune.resume, False
    return [pretrain, finetune]


def preset_of(args):
    if args.preset:
        return args.preset
    if args.text_encoder == "tiny" and args.audio_encoder == "tiny":
        return "demo"
    return "frozen" if args.freeze_encoders else "paper"


def stage_settings(stage, args, device, out, init, batch_size):
    """-> one stage's settings: args, and the preset's value of every option args leaves out;
    out, init, batch_size: this stage's (None for the defaults)"""
    preset = preset_of(args)

    def default(value):  # a preset's value, for this stage and device
        for key in (stage, device.type):
            value = value[key] if isinstance(value, dict) and key in value else value
        return value
    given = vars(args) | {"batch_size": batch_size, "shape_grid": args.shape_grid and args.shape_grid == "on"}
    chosen = {key: default(v) if given.get(key) is None else given[key] for key, v in (PRESETS[preset] | SPEED).items()}
    if chosen["lr_encoder"] is None:
        chosen["lr_encoder"] = chosen["lr"]
    n_proc, b = world(), chosen["batch_size"]
    # default: one micro-batch a process, or more where a process's share of windows exceeds MICRO_WINDOWS
    n_micro = args.micro_batches or n_proc * (math.ceil(b / n_proc / MICRO_WINDOWS) if stage == "pretrain" else 1)
    if n_micro % n_proc:
        raise SystemExit(f"train.py: --micro-batches {n_micro} does not divide among {n_proc} processes")
    if b < n_micro:
        raise SystemExit(f"train.py: a batch of {b} cannot be split into {n_micro} micro-batches "
                         f"(--micro-batches or processes): use --batch-size {n_micro} or more")
    if stage == "pretrain" and b < 2 * n_micro:
        print0(f"train.py: micro-batches of one window: their noise candidates come from the whole split and are "
               f"each encoded on top (--batch-size {2 * n_micro} or more avoids it)")
    out = out or os.path.join("out", f"{os.path.basename(os.path.normpath(args.data))}-{stage}")
    # --resume of --stage all: each stage continues where it has a state, the others start (again)
    resume = args.resume and (args.stage != "all" or os.path.isfile(os.path.join(out, "state.pt")))
    return argparse.Namespace(**{**vars(args), **chosen, "stage": stage, "preset": preset, "out": out, "init": init,
                                 "micro_batches": n_micro, "resume": resume,
                                 "overwrite": args.overwrite or (args.resume and not resume)})


def for_scoring(data, modalities, device):
    """The settings a fine-tuned model is scored with outside train.py (sample.py --score): train.py's
    defaults, on all of data's splits"""
    return argparse.Namespace(stage="finetune", data=data, modalities="all" if len(modalities) > 1 else modalities[0],
                              train_fraction=1.0, max_padding=options("").get_default("max_padding"),
                              **{k: v[device.type] for k, v in SPEED.items()})


def as_line(s):
    """The line a stage starts with: its preset, and the value of every setting a preset gives"""
    keys = list(PRESETS[s.preset] | SPEED) + ["micro_batches"]
    return f"{s.stage} settings (preset {s.preset}): " + ", ".join(f"{k} {shown(getattr(s, k))}" for k in keys)


def compared(s):
    """What a run's results depend on, as {option: value}: --resume refuses a command that gives another"""
    def path(p):
        return p if p in (None, "tiny") else os.path.abspath(p)
    values = {k: path(v) if k in ("data", "text_encoder", "audio_encoder", "init") else v
              for k, v in vars(s).items() if k not in HOW_TO_RUN}
    values["train_fraction"] = s.train_fraction if s.stage == "finetune" else 1.0
    return {"--" + k.replace("_", "-"): v for k, v in values.items()}


def shown(value):
    """A setting as a message shows it"""
    if isinstance(value, bool) or value is None:
        return {True: "on", False: "off", None: "none"}[value]
    if isinstance(value, list):
        return ", ".join(map(str, value))
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)
