"""
Checkpoints and --resume. A run folder belongs to one run: it holds the kept model
(model.safetensors, with config.json for sample.py and fine-tuning's --init), metrics.json,
log.json and state.pt, the state --resume continues from: the model, the optimiser, the random
states, and the run's Progress with the settings it was started with.
"""
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import sys
from dataclasses import asdict, dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nanotcmp.data import is_dataset
from nanotcmp.files import (DataError, cannot_write, clean_leftovers, file_sha256, make_folder, read_json, write_atomic,
                            write_json)
from nanotcmp.model import TCMP, Bert, Hubert, TCMPConfig
from nanotcmp.processes import barrier, gather, print0, rank, world
from nanotcmp.settings import STAGES, compared, shown


ENCODERS = {"text": "bert", "audio": "hubert"}  # a modality -> its encoder: the model's attribute, its tensors' prefix


def save_model(model, out, stage, meta, data):
    """The kept model into the run folder out: model.safetensors, and config.json for sample.py and
    fine-tuning's --init; meta, data: the dataset's meta.json and folder. The encoders a frozen run
    read from checkpoint folders are not saved: config.json names them (model.checkpoints)."""
    named = model.checkpoints if model.frozen else {}  # {modality: (its checkpoint folder, weights_sha256)}
    write_atomic(os.path.join(out, "model.safetensors"),
                 lambda p: save_file({k: v.contiguous() for k, v in own_tensors(model).items()}, p))
    config = {"stage": stage, "model": asdict(model.config), "frozen": model.frozen, "labels": meta["labels"],
              "encoders": {key: {**reference(path), "sha256": sha} for key, (path, sha) in named.items()},
              "vocab": {"sha256": meta["vocab"]["sha256"], **reference(model.vocab_file)},
              **{k: meta["settings"][k] for k in ("max_tokens", "max_context", "max_seconds")},  # prepare.py's cuts
              "data": data}
    write_json(os.path.join(out, "config.json"), config)


def own_tensors(model):
    """The tensors a run keeps of its model (model.safetensors, state.pt): all but those of the
    encoders a frozen run names (model.checkpoints), which stay as their checkpoints have them"""
    named = tuple(ENCODERS[key] + "." for key in (model.checkpoints if model.frozen else {}))
    return {k: v for k, v in model.state_dict().items() if not k.startswith(named)}


def load_own(model, tensors):
    """own_tensors back into the model that made them"""
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) == set(model.state_dict()) - set(own_tensors(model)), "own_tensors changed"


def load_kept(model, out):
    """The kept model of the run folder out back into the model that trained it"""
    load_own(model, load_file(os.path.join(out, "model.safetensors")))


def reference(path):
    """A file or folder as config.json names it: by its absolute path, or, inside an installed Python
    package (a checkpoint that pip installs), by the package and the path within it, so that the run
    folder serves wherever the package is installed"""
    path = os.path.abspath(path)
    roots = {os.path.abspath(p) for p in sys.path if p}
    folder = path
    while os.path.dirname(folder) != folder:
        if os.path.dirname(folder) in roots and os.path.isfile(os.path.join(folder, "__init__.py")):
            pip = importlib.metadata.packages_distributions().get(os.path.basename(folder))
            if pip:
                return {"package": os.path.basename(folder), "pip": pip[0], "path": os.path.relpath(path, folder)}
        folder = os.path.dirname(folder)
    return {"path": path}


def resolve(ref, what):
    """A reference (see reference) -> the path it names, where the package is installed here; what: the
    file or folder, for the message"""
    if "package" not in ref:
        return ref["path"]
    spec = importlib.util.find_spec(ref["package"])
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"{what} comes with the Python package {ref['pip']}, which is not installed here: "
                        f"pip install {ref['pip']}")
    return os.path.join(spec.submodule_search_locations[0], ref["path"])


def weights_sha256(module):
    """sha256 of a module's tensors, their names and bytes"""
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def load_run(folder, stage):
    """A run folder written by train.py -> (its config.json, its model's tensors), checked: both
    files there and complete, config.json's values of the types train.py writes, the vocabulary
    where config.json says, unchanged (its sha256), with "path" where it is here. stage: the stage
    wanted, for the folder of a run of both stages"""
    config_path, model_path = os.path.join(folder, "config.json"), os.path.join(folder, "model.safetensors")
    if not os.path.isfile(config_path) and any(os.path.isdir(os.path.join(folder, s)) for s in STAGES):
        raise DataError(f"{folder} is the folder of a run of both stages (train.py --stage all): give its {stage} "
                        f"folder, {os.path.join(folder, stage)}")
    if not os.path.isfile(config_path) and os.path.isfile(os.path.join(folder, "state.pt")):
        raise DataError(f"{folder} is a run of train.py that has kept no model yet (stopped before its first epoch "
                        f"ended): continue it with python train.py --resume --out {folder} and the options it was "
                        f"started with")
    config = read_json(config_path, CONFIG_TYPES, "a run of train.py")
    if bad := [k for k, kind in CONFIG_TYPES.items()
               if not isinstance(config[k], kind) or isinstance(config[k], bool) != (kind[0] is bool)]:
        kind = {str: "a string", dict: "an object", list: "a list", int: "an integer", float: "a number",
                bool: "true or false"}
        raise DataError(f"{config_path}: {bad[0]} is {json.dumps(config[bad[0]])}, where train.py writes "
                        f"{kind[CONFIG_TYPES[bad[0]][0]]}: put back the run's own config.json, or train again")
    if not os.path.isfile(model_path):
        raise DataError(f"{model_path} not found: is {folder} a run of train.py?")
    try:
        tensors = load_file(model_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{model_path}: unreadable or incomplete ({e}); train again or copy it again") from None
    vocab = config["vocab"]
    if not isinstance(vocab.get("path"), str):
        raise DataError(f"{config_path}: vocab has no path: put back the run's own config.json")
    vocab["path"] = resolve(vocab, f"{folder}'s vocabulary")
    if not os.path.isfile(vocab["path"]):
        raise DataError(f"{config_path}: the run's vocabulary {vocab['path']} is not there (moved or deleted?); "
                        f"put it back, or set its path in config.json")
    if file_sha256(vocab["path"]) != vocab.get("sha256"):
        raise DataError(f"{vocab['path']}: not the vocabulary {folder} was trained with (another sha256): its word "
                        f"pieces would get other ids")
    return config, tensors


def load_model(folder, stage):
    """A run folder -> (its TCMP model, in eval mode, on the CPU; its config.json, see load_run). The
    encoders a frozen run names are read from their checkpoint folders, and must be the weights it
    was trained on."""
    config, tensors = load_run(folder, stage)
    try:
        model = TCMP(TCMPConfig(**{**config["model"], "modalities": tuple(config["model"]["modalities"])}))
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(f"{folder} does not match this code's TCMP ({e})") from None
    for key, ref in config["encoders"].items():
        path = resolve(ref, f"{folder}'s {key} encoder")
        try:
            encoder = (Bert if key == "text" else Hubert).from_pretrained(path)
        except (FileNotFoundError, ValueError) as e:
            raise DataError(f"{folder}'s {key} encoder: {e}") from None
        if weights_sha256(encoder) != ref.get("sha256"):
            raise DataError(f"{path}: not the {key} encoder {folder} was trained on (other weights)")
        tensors |= {f"{ENCODERS[key]}.{name}": t for name, t in encoder.state_dict().items()}
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:
        raise DataError(f"{folder} does not match this code's TCMP ({str(e).strip().splitlines()[0]})") from None
    if config["frozen"]:
        model.freeze_encoders()
    return model.eval(), config


# config.json's keys and the types of their values (the first type named in errors)
CONFIG_TYPES = {"stage": (str,), "model": (dict,), "frozen": (bool,), "encoders": (dict,), "labels": (list,),
                "vocab": (dict,), "max_tokens": (int,), "max_context": (int,), "max_seconds": (float, int)}
RUN_FILES = ("model.safetensors", "config.json", "metrics.json", "log.json", "state.pt")


def dataset_around(path):
    """The dataset folder (made by prepare.py) path is in or is, or None"""
    folder = os.path.abspath(path)
    while not is_dataset(folder):
        if os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)
    return folder


def refuse_mixing(out, resume, overwrite):
    """A run folder belongs to one run: refuse an out inside a dataset folder (prepare.py replaces it
    whole, runs and all), and a new run into a folder holding a run unless overwrite"""
    if os.path.isfile(out):
        raise DataError(f"{out} is a file, not a folder: choose another --out")
    dataset = dataset_around(out)
    if dataset:
        raise DataError(f"--out {out} is inside the dataset {dataset}, which prepare.py replaces whole when it "
                        f"prepares it again (runs and all): choose a folder outside it")
    found = [f for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
    if found and not resume and not overwrite:
        how = "continue it with --resume, or replace it" if "state.pt" in found else \
            "it has no state to resume from: replace it"
        raise DataError(f"--out {out} holds a run ({', '.join(found)}): {how} with --overwrite")


def claim_folders(stages):
    """Before anything is trained: refuse_mixing for each stage's folder, then with --overwrite the
    old run's files removed"""
    for s in stages:
        refuse_mixing(s.out, s.resume, s.overwrite)
    if rank() == 0:
        for s in stages:
            found = [f for f in RUN_FILES if os.path.exists(os.path.join(s.out, f))] if s.overwrite else []
            for f in found:
                try:
                    os.remove(os.path.join(s.out, f))
                except OSError as e:
                    raise cannot_write(os.path.join(s.out, f), e) from None
            if found:
                print(f"removed the run in {s.out} ({', '.join(found)}), to start it again")
    barrier()


@contextlib.contextmanager
def run_folder(s, meta, model, opt, device, total, per_epoch):
    """A stage's run folder, made ready (what a killed run left there removed) -> its Progress:
    resumed from state.pt with --resume, else new; None for a run resumed once it was done. A stage
    that fails before writing anything in the folder it made leaves no folder behind. meta: the
    dataset's, whose sha256 the run keeps with its settings"""
    created = rank() == 0 and not os.path.isdir(s.out)
    try:
        if rank() == 0:
            make_folder(s.out)
            clean_leftovers(s.out)
        barrier()
        path = os.path.join(s.out, "state.pt")
        settings = compared(s) | {"dataset": meta["sha256"]}  # (prepare.py's rebuild changes meta.json)
        progress = resume(path, model, opt, device, settings) if s.resume else Progress(settings=settings)
        done = progress.finished(total, per_epoch, s.patience) and os.path.isfile(os.path.join(s.out, "metrics.json"))
        if done:
            print0(f"{s.stage} was done: {s.out} (--resume has nothing to continue)")
        yield None if done else progress
    except BaseException:
        if created and os.path.isdir(s.out) and not os.listdir(s.out):
            os.rmdir(s.out)
        raise


def interrupted(stages, argv):
    """Ctrl-C: what is kept, and the command that continues from it"""
    states = [p for p in (os.path.join(s.out, "state.pt") for s in stages) if os.path.isfile(p)]
    if not states:
        return "interrupted before a state was saved (every --save-every steps and at each epoch's end)"
    again = [a for a in argv if a != "--overwrite"] + ([] if "--resume" in argv else ["--resume"])
    return f"interrupted; kept {', '.join(states)}: continue with python train.py {shlex.join(again)}"


def load_init(model, folder, meta):
    """Start fine-tuning from a pre-training run of the same vocabulary and modalities: every tensor
    but the emotion heads (Eq. 22's and --context-emotions') must fit."""
    try:
        config, ckpt = load_run(folder, "pretrain")
    except DataError as e:
        raise DataError(f"--init: {e}") from None
    if config["stage"] != "pretrain":
        raise DataError(f"--init {folder} is a {config['stage']} run; fine-tuning starts from a pre-training run "
                        f"(train.py --stage pretrain)")
    theirs, ours = config["model"], json.loads(json.dumps(asdict(model.config)))  # as config.json keeps it
    for key, option in (("modalities", "--modalities"), ("d", "--d"), ("distant", "--no-distant")):
        if theirs.get(key) != ours[key]:
            raise DataError(f"--init {folder} was pre-trained with {key} {shown(theirs.get(key))}, this model has "
                            f"{shown(ours[key])}: fine-tune with the {option} of its pre-training")
    for key, option in (("bert", "--text-encoder"), ("hubert", "--audio-encoder")):
        if without_dropout(theirs.get(key)) != without_dropout(ours[key]):  # (dropout may differ)
            raise DataError(f"--init {folder} was pre-trained with another {option} (its config: "
                            f"{shown(without_dropout(theirs.get(key)))}): fine-tune with the {option} of its "
                            f"pre-training")
    if config["vocab"]["sha256"] != meta["vocab"]["sha256"]:
        raise DataError(f"--init {folder} was trained with the vocabulary {config['vocab']['path']}, "
                         f"the dataset is prepared with another ({meta['vocab']['path']}): their ids differ")
    for key, ref in config["encoders"].items():  # a frozen pre-training's encoders: this run's must be the same
        if weights_sha256(getattr(model, ENCODERS[key])) != ref["sha256"]:
            where = ref["path"] + (f" of the package {ref['pip']}" if "pip" in ref else "")
            raise DataError(f"--init {folder} was pre-trained on the {key} encoder {where}, whose "
                            f"weights this run's --{key}-encoder does not have: fine-tune with that encoder")
    skip = ("head1.", "head2.", "recognise.") + tuple(ENCODERS[key] + "." for key in config["encoders"])
    path, state = os.path.join(folder, "model.safetensors"), model.state_dict()
    wanted = [n for n in state if not n.startswith(skip)]
    bad = [f"{n}: model {tuple(state[n].shape)}, checkpoint "
           f"{tuple(ckpt[n].shape) if n in ckpt else 'missing'}" for n in wanted
           if n not in ckpt or ckpt[n].shape != state[n].shape]
    if bad:
        raise DataError(f"--init {path} does not fit this model:\n  " + "\n  ".join(bad))
    model.load_state_dict({n: ckpt[n] for n in wanted}, strict=False)


def without_dropout(encoder_config):
    return encoder_config and {k: v for k, v in encoder_config.items() if k != "dropout"}


@dataclass
class Progress:
    """Where a run is: saved in state.pt with the model, the optimiser and the random states"""
    step: int = 0  # steps done
    best: dict | None = None  # the kept model's epoch and dev scores
    history: list = field(default_factory=list)  # log.json: a record every --log-every steps
    dev_by_epoch: list = field(default_factory=list)
    settings: dict = field(default_factory=dict)  # {option: value} the run was started with

    def finished(self, total, per_epoch, patience):
        """Every step done, or patience epochs without a better dev score (0: never)"""
        epochs_done = self.step // per_epoch
        return self.step == total or bool(patience and self.best and epochs_done - self.best["epoch"] >= patience)


def save_state(path, model, opt, progress, device):
    """state.pt, which --resume continues from, with every process's random state (dropout's)"""
    rngs = gather((torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None))
    if rank() == 0:
        write_atomic(path, lambda p: torch.save({"model": own_tensors(model), "opt": opt.state_dict(),
                                                 **asdict(progress), "rng": rngs}, p))
    barrier()


def resume(path, model, opt, device, settings):
    """--resume: the model, the optimiser and this process's random state from state.pt -> its
    Progress. settings: {option: value} of this command, which must be the run's."""
    if not os.path.isfile(path):
        raise DataError(f"--resume: no {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        missing = [k for k in ("model", "opt", "step", "best", "history", "dev_by_epoch", "settings", "rng")
                   if k not in state]
    except Exception as e:  # torch.load raises what the unpickler meets: EOFError, UnpicklingError, ...
        raise DataError(f"--resume: {path} is unreadable or incomplete "
                         f"({type(e).__name__}); start again without --resume") from None
    if missing:
        raise DataError(f"--resume: {path} has no {', '.join(missing)}: not a state of train.py")
    if len(state["rng"]) != world():
        raise DataError(f"--resume: {path} was saved by {len(state['rng'])} processes, "
                         f"this run has {world()}")
    for option, value in settings.items():
        if option != "dataset" and state["settings"].get(option) != value:
            raise DataError(f"--resume: {path} is a run of {option} {shown(state['settings'].get(option))}, this "
                            f"command gives {option} {shown(value)}: resume with the run's settings, or start "
                            f"again with --overwrite")
    if state["settings"].get("dataset") != settings["dataset"]:
        raise DataError(f"--resume: {path} is a run on {settings['--data']} as it was before prepare.py wrote it again "
                        f"(its meta.json has changed): start again with --overwrite, or prepare the dataset as it was")
    load_own(model, state["model"])
    opt.load_state_dict(state["opt"])
    cpu_rng, cuda_rng = state["rng"][rank()]
    torch.set_rng_state(cpu_rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, device)
    print0(f"resumed at step {state['step']}")
    return Progress(state["step"], state["best"], state["history"], state["dev_by_epoch"], settings)
