"""Fine-tune a pretrained ViT-Tiny on CIFAR-10/100 with NoRA (or a baseline) and reproduce the paper's tables.

    python train_vit.py --groups 8 --rank 2                       # NoRA, paper protocol (appendix C)
    python train_vit.py --method lora --dataset cifar100 --scale small
    python train_vit.py --table methods --scale small             # Table 1 at laptop scale
    python train_vit.py --method nora --scale small --save a.pt   # then: --eval-adapter a.pt
    python train_vit.py --scale small --plot-activations act.svg  # draw what NoRA learned
    python train_vit.py --table frontier --plot frontier.svg ...  # README: accuracy per parameter
    torchrun --nproc_per_node 8 train_vit.py --groups 8 --rank 2 # data-parallel on 8 GPUs (DDP)

The method itself lives in nora.py; this script parses arguments, loads data, trains and prints.
In order: defaults, data, the model, one training run, the tables (the paper's; the lr study and
stability grid; the frontier; efficiency), the baselines of the paper's tables, the command line.
"""
import argparse
import contextlib
import functools
import inspect
import json
import math
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._python_dispatch
import torch.utils._pytree

import nora
from fit_gelu import hue, write_svg

# --- defaults: the paper's protocol (appendix C). Each is also a flag: lr -> --lr, head_lr -> --head-lr.
DEFAULTS = dict(
    method="nora",                 # or lora, nora++, full, head, ... (METHODS below)
    groups=8, rank=2,              # NoRA: G groups of channels share a rational; rank r of its update
    lora_rank=8,                   # LoRA and NoRA++: rank r of the weight update, alpha = 2 r (paper C.1: 8, 16)
    alpha=None,                    # NoRA's update is scaled by alpha / r; None: alpha = 2 r (released code)
    basis_scale=None,              # None: nora.NoRA's (x/3)^i basis; 1: the paper's monomials x^i
    lr=None,                       # LoRA, full, ...: 1e-3 (VPT 5e-3, DoRA 5e-4; paper C.1). Given: every part trains at it
    head_lr=None,                  # None: HEAD_LR, or --lr when that is given
    nora_lr=None,                  # None: NORA_LR, or --lr when that is given
    weight_decay=0.05,             # AdamW with a cosine schedule, no warm-up
    scale="paper",                 # image size, epochs, batch size and subsets: SCALES below
    model=nora.DEFAULT_WEIGHTS,    # the paper's augreg ViT-Tiny (nora.PRETRAINED)
    dataset="cifar10", data_root="data", seed=0,
)
# --scale presets. 'paper' is appendix C (Table 7); 'small' finishes a table on a 2-core CPU.
SCALES = {
    "paper": dict(img_size=224, epochs=50, batch_size=256, train_subset=0, test_subset=0),
    "small": dict(img_size=64, epochs=5, batch_size=64, train_subset=5000, test_subset=1000),
}

CIFAR = {  # folder, train files, test file, label key, archive URL, its md5 (as torchvision has them)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
METHOD_LR = {"vpt": 5e-3, "dora": 5e-4}          # paper C.1; every other method uses --lr (1e-3)
# With no --lr, the head and NoRA's update get learning rates of their own, chosen on validation
# (README, "Results"): the paper's one lr of 1e-3 leaves a fresh head and NoRA's update in the
# (x/3)^i basis moving too slowly to beat a tuned linear probe.
HEAD_LR = 1e-2    # with NoRA training: the lowest tried (0.3 .. 0.01) at 400 steps; a probe alone wants 0.3
NORA_LR = 3e-2    # with the head at 1e-2, chosen at 80, 400 and 2,000 steps (1e-1 collapsed at 80 and 400);
                  # that it suits the paper's 9,750 steps too extrapolates that flat trend: not measured
BASIS_SCALE = inspect.signature(nora.NoRA).parameters["basis_scale"].default    # nora.NoRA's s (3)


def learning_rates(args):
    """(lr, head lr, NoRA lr) of a run: the flags where given; else, with --lr given, every part at
    it (the paper's protocol); else HEAD_LR and NORA_LR (the paper's monomial basis keeps --lr: it
    wants a 30x smaller step than ours)."""
    lr = args.lr if args.lr is not None else METHOD_LR.get(args.method, 1e-3)
    own = args.lr is None
    head = args.head_lr or (HEAD_LR if own else lr)
    ours = args.method != "nora-monomial" and args.basis_scale in (None, BASIS_SCALE)
    return lr, head, args.nora_lr or (NORA_LR if own and ours else lr)

# The paper's numbers, printed beside ours.
PAPER = {
    "methods": {"full": (90.71, 77.19), "vpt": (89.62, 75.43), "adapter": (89.93, 75.88), "lora": (91.05, 77.68),
                "qlora": (90.45, 77.01), "dora": (91.13, 77.71), "nora": (90.88, 77.46), "nora++": (91.24, 77.76)},
    "groups": {8: (92.2, 77.6), 64: (93.1, 79.6)},            # read off Figure 2 (approximate)
    "ablation": {"rational": (None, 76.56), "zero-init": (None, 76.44), "const": (None, 74.91),
                 "nora-num": (86.92, 73.58), "nora-den": (87.40, 74.16), "nora": (90.88, 77.46)},
    "activations": {"prelu": (None, 53.21), "arelu": (None, 54.17), "elu": (None, 52.84), "nora": (None, 77.46)},
}
TABLES = {
    "methods": ["head", "full", "vpt", "adapter", "lora", "qlora", "dora", "nora", "nora++"],
    "groups": [8, 16, 32, 64],
    "ablation": ["rational", "zero-init", "const", "nora-num", "nora-den", "nora", "nora-group"],
    "activations": ["prelu", "arelu", "elu", "nora"],
}


# --- data --------------------------------------------------------------------------------------

def load_cifar(name, root, download=True):
    """(train_x, train_y, test_x, test_y): uint8 (N, 3, 32, 32) images and int64 labels."""
    folder, train_files, test_file, key, url, md5 = CIFAR[name]
    path = Path(root) / folder
    if not path.is_dir():
        if not download:
            sys.exit(f"error: {path} not found. Put the extracted python-format archive there "
                     f"({url}) or drop --no-download.")
        from torchvision.datasets.utils import download_and_extract_archive
        try:
            download_and_extract_archive(url, str(root), md5=md5)
        except Exception as e:  # urllib, socket and checksum errors all land here
            sys.exit(f"error: could not download {name} from {url} ({e}).\nOn a machine without internet, "
                     f"download {url.rsplit('/', 1)[-1]} elsewhere, extract it so that {path} exists, "
                     f"and pass --data-root {root}.")

    def read(files):
        xs, ys = [], []
        for f in files:
            redo = f"Delete {path} and run again to re-download, or extract the archive there again."
            if not (path / f).is_file():
                sys.exit(f"error: {path / f} is missing; the {name} folder is incomplete. {redo}")
            try:
                with open(path / f, "rb") as fh:
                    batch = pickle.load(fh, encoding="latin1")
                data, labels = np.asarray(batch["data"], dtype=np.uint8), np.asarray(batch[key], dtype=np.int64)
                if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels) or not len(data):
                    raise ValueError(f"{data.shape} data for {len(labels)} labels, expected (N, 3072) for N > 0")
            except Exception as e:                    # truncated, empty, not a pickle, wrong keys or shapes
                sys.exit(f"error: {path / f} is not a valid {name} batch ({type(e).__name__}: {e}). {redo}")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels)
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    return (*read(train_files), *read([test_file]))


def balanced_subset(labels, n, seed):
    """Indices of n examples, as equal a number from each class as possible, chosen with ``seed``."""
    if not n or n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per_class = [torch.nonzero(labels == c).flatten() for c in classes]
    picked = [idx[torch.randperm(len(idx), generator=g)[: n // len(classes) + (i < n % len(classes))]]
              for i, idx in enumerate(per_class)]
    return torch.cat(picked).sort().values


def preprocess(x, img_size, mean, std, device, flip=None):
    """uint8 (B, 3, 32, 32) -> normalised float (B, 3, S, S) on ``device``, mirrored where the bool
    tensor ``flip`` (B,) says. The uint8 batch moves first (if it is not there yet): resizing to
    224 px on the CPU would starve a GPU. ``mean`` and ``std`` are (3, 1, 1) tensors on ``device``."""
    x = x.to(device).float() / 255
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if img_size != x.shape[-1]:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return (x - mean) / std


# --- model -------------------------------------------------------------------------------------

METHODS = ("head", "full", "lora", "dora", "qlora", "vpt", "adapter", "nora", "nora++", "nora-monomial",
           "nora-group", "nora-num", "nora-den", "rational", "zero-init", "const", "prelu", "elu", "arelu")


def prepare(model, method, groups=8, rank=2, alpha=None, lora_rank=8, lora_alpha=16, **nora_kwargs):
    """Set ``model`` (a VisionTransformer) up for fine-tuning with ``method`` (one of METHODS) and
    make its head trainable. The Table 4 variants, on frozen GELU-fitted base coefficients:
    'rational' tunes the coefficients directly, 'zero-init' adds a full-rank zero-initialised
    update (NoRA without the low-rank factorisation), 'const' tunes only a0 (our Q has no b0),
    all with ``groups`` groups. 'nora-monomial' is NoRA with the paper's update of the plain
    monomial coefficients (basis_scale=1). ``nora_kwargs`` go to every NoRA module."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    nora.freeze(model)
    dim = model.cls_token.shape[-1]
    if method == "full":
        model.requires_grad_(True)
    elif method == "head":
        pass
    elif method in ("lora", "dora", "qlora"):
        if method == "qlora":
            nora.replace_modules(model.blocks, lambda m: type(m) is nn.Linear, NF4Linear)
        nora.add_lora(model, lora_rank, lora_alpha, layer=DoRALinear if method == "dora" else nora.LoRALinear)
    elif method == "vpt":
        model.blocks = nn.Sequential(PromptTokens(10, dim), *model.blocks)
    elif method == "adapter":
        model.blocks = nn.Sequential(*[nn.Sequential(block, Adapter(dim, 48)) for block in model.blocks])
    elif method.startswith("nora"):
        if method == "nora-monomial":
            nora_kwargs["basis_scale"] = 1.0
        nora.add_nora(model, groups, rank, alpha=alpha, form="per_group" if method == "nora-group" else "shared", **nora_kwargs)
        if method in ("nora-num", "nora-den"):            # Table 5: adapt one side of the rational only
            fixed = "Q" if method == "nora-num" else "P"
            for m in (m for m in model.modules() if isinstance(m, nora.NoRA)):
                getattr(m, f"A_{fixed}").requires_grad_(False)
                getattr(m, f"B_{fixed}").requires_grad_(False)
        if method == "nora++":
            nora.add_lora(model, lora_rank, lora_alpha)
    elif method == "rational":
        nora.replace_modules(model, lambda m: isinstance(m, nn.GELU), lambda m: nora.GroupRational(groups))
    elif method in ("zero-init", "const"):
        nora.replace_modules(model, lambda m: isinstance(m, nn.GELU),
                             lambda m: DeltaRational(groups, *((6, 4) if method == "zero-init" else (1, 0))))
    else:                                                 # Table 3: other learnable activations
        make = {"prelu": lambda m: nn.PReLU(), "elu": lambda m: LearnableELU(), "arelu": lambda m: AReLU()}[method]
        nora.replace_modules(model, lambda m: isinstance(m, nn.GELU), make)
    return nora.mark_trainable(model, "head")


def build_model(args):
    """The pretrained ViT, set up for args.method. Returns (model, total parameters of the base model)."""
    torch.manual_seed(args.seed)
    model = nora.create_vit(args.model, img_size=args.img_size, num_classes=NUM_CLASSES[args.dataset], depth=args.depth)
    if args.weights != "none":
        try:
            nora.load_pretrained(model, args.weights or args.model)
        except (RuntimeError, OSError, ValueError) as e:
            sys.exit(f"error: {e}")
    total = nora.count_parameters(model)[1]
    prepare(model, args.method, groups=args.grow_from or args.groups, rank=args.rank, alpha=args.alpha,
            lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank,
            **({} if args.basis_scale is None else {"basis_scale": args.basis_scale}))
    if args.grow_from:                                  # paper Sec. 4.2: replicate groups
        for m in model.modules():
            if isinstance(m, nora.NoRA):
                m.grow(args.groups)
    return model.to(args.device), total


# --- training ----------------------------------------------------------------------------------

def input_pipeline(args):
    """preprocess with this run's image size, normalisation and device: uint8 batch -> model input."""
    mean, std = (torch.tensor(v, device=args.device)[:, None, None] for v in (args.mean, args.std))   # built once
    return functools.partial(preprocess, img_size=args.img_size, mean=mean, std=std, device=args.device)


def evaluate(model, x, y, prep, batch_size, amp=None):
    """Top-1 accuracy (%) of ``model`` on the uint8 images ``x``; ``prep`` makes a batch its input.
    ``amp``: the autocast dtype, or None. One host-device sync, at the end. Under torchrun only
    rank 0 evaluates, and sends the result to the others, so all take the same decisions."""
    if torch.distributed.is_initialized():
        result = [evaluate_here(model, x, y, prep, batch_size, amp) if torch.distributed.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(result, src=0)
        return result[0]
    return evaluate_here(model, x, y, prep, batch_size, amp)


def evaluate_here(model, x, y, prep, batch_size, amp=None):
    device = next(model.parameters()).device
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        for i in range(0, len(x), batch_size):
            correct += (model(prep(x[i:i + batch_size])).argmax(1) == y[i:i + batch_size].to(device)).sum()
    model.train()
    return 100.0 * correct.item() / len(x)


def to_device(t, device):
    """``t`` on ``device`` without a host-device sync: from pinned memory a copy is queued like a kernel."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


class Diverged(Exception):
    pass


def train(args, data, eval_name="test"):
    """Fine-tune on data[:2]; after each epoch, report the accuracy on data[2:] (the test set, or
    the validation split in --table study)."""
    train_x, train_y, test_x, test_y = data
    model, total = build_model(args)
    trainable = nora.count_parameters(model)[0]
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head") and p.requires_grad)
    # torchrun: every process holds the model; DDP averages the trainable parameters' gradients
    # over them. broadcast_buffers=False: a forward then needs no collective (our ViT has no buffers).
    forward = model if args.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[args.device] if args.device.type == "cuda" else None, broadcast_buffers=False)
    steps_per_epoch = max(1, len(train_x) // args.batch_size)
    steps = args.epochs * steps_per_epoch if args.steps is None else args.steps
    lr, head_lr, own_lr = learning_rates(args)
    opt = torch.optim.AdamW(nora.param_groups(model, lr, head_lr, own_lr), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    # float16 AMP's loss scale starts at 2^10, not torch's 2^16: the fresh head's first steps at its own lr
    # (loss ~7) overflow float16 gradients at 2^16 and skip 3 steps on the real ViT-S (README, "On a GPU")
    scaler = torch.amp.GradScaler(init_scale=2.0 ** 10, enabled=args.amp == torch.float16 and args.device.type == "cuda")
    g = torch.Generator().manual_seed(args.seed)
    train_x, train_y = train_x.to(args.device), train_y.to(args.device)   # CIFAR's uint8 fits on any GPU
    prep = input_pipeline(args)
    print(f"{args.method} on {args.dataset}: {len(train_x)} train / {len(test_x)} {eval_name} images at {args.img_size} px, "
          f"{steps} steps, lr {lr:g}, head lr {head_lr:g}{f', NoRA lr {own_lr:.2g}' if 'nora' in args.method else ''}, "
          f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    history, step, start, seen = [], 0, time.time(), 0
    shard = args.batch_size // args.world                # torchrun: this process's part of each batch
    model.train()
    while step < steps:
        # an epoch's order and flips, drawn on the CPU (the same on any device) and moved once
        order = to_device(torch.randperm(len(train_x), generator=g), args.device)
        flips = to_device(torch.rand(steps_per_epoch * args.batch_size, generator=g) < 0.5, args.device)
        for i in range(steps_per_epoch):
            if step == steps:
                break
            # the global batch, as in a single process; this process takes its 1/world of it
            first = i * args.batch_size + args.process * shard
            batch = slice(first, first + shard)
            idx = order[batch]
            xb = prep(train_x[idx], flip=flips[batch])
            with torch.autocast(args.device.type, dtype=args.amp, enabled=args.amp is not None):
                loss = F.cross_entropy(forward(xb), train_y[idx])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step, seen = step + 1, seen + args.batch_size
            if step % args.log_every == 0 or step == steps:   # the loop's only host-device sync
                if args.world > 1:                      # the global batch's loss, the same in every process
                    loss = loss.detach().clone()
                    torch.distributed.all_reduce(loss)
                    loss /= args.world
                value = loss.item()
                if not math.isfinite(value):
                    raise Diverged(f"loss is {value} at step {step}; lower --lr (now {lr:g}) or the NoRA --alpha")
                rate = seen / (time.time() - start)
                left = (steps - step) * args.batch_size / rate
                print(f"  step {step}/{steps}  loss {value:.4f}  {rate:.0f} img/s  "
                      f"{time.strftime('%H:%M:%S', time.gmtime(left))} left", flush=True)
            if step % steps_per_epoch == 0 or step == steps:
                history.append(evaluate(model, test_x, test_y, prep, args.batch_size, args.amp))
                print(f"  epoch {len(history)}: {eval_name} accuracy {history[-1]:.2f}%", flush=True)
    return model, dict(trainable=trainable, backbone=trainable - head, total=total, percent=100 * trainable / total,
                       lr=lr, head_lr_used=head_lr,
                       nora_lr_used=own_lr if "nora" in args.method else None,
                       accuracy=history[-1], history=history, seconds=round(time.time() - start, 1),
                       **activation_drift(model))


def group_curves(m, x):
    """(len(x), G): each group's function of a NoRA or GroupRational module ``m`` at the points ``x``."""
    num, den = m.coefficients() if isinstance(m, nora.NoRA) else (m.numerator, m.denominator)
    with torch.no_grad():                                 # column g of (N, G) inputs goes through group g's rational
        return nora.rational(x[:, None].expand(-1, len(num)).contiguous(), num.detach().cpu(), den.detach().cpu())


def activation_drift(model, x_range=8.0):
    """How far training moved NoRA's activations: the largest |phi(x) - GELU(x)| on the fit range over
    all layers and groups, and in how many layers a group's leading denominator coefficient b_n
    (GELU's fit: 1.5e-3; it sets the tails, nora.py section 4) went below zero."""
    x = torch.linspace(-x_range, x_range, 161)
    noras = [m for m in model.modules() if isinstance(m, nora.NoRA)]
    if not noras:
        return dict(drift=None, layers_b_n_below_zero=None)
    drift = max((group_curves(m, x) - F.gelu(x)[:, None]).abs().max().item() for m in noras)
    with torch.no_grad():
        below = sum((m.coefficients()[1][:, -1] < 0).any().item() for m in noras)
    return dict(drift=drift, layers_b_n_below_zero=below)


def record(args, result):
    rec = {**{k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}, **result}
    print(f"RESULT method={args.method} dataset={args.dataset} trainable={result['trainable']:,} "
          f"({result['percent']:.3f}%) accuracy={result['accuracy']:.2f}% time={result['seconds']:.0f}s"
          + ("" if result.get("drift") is None else f" max|phi-GELU| on [-8,8]={result['drift']:.3g}, "
             f"b_n<0 in {result['layers_b_n_below_zero']} layers"))
    append_record(args, rec)
    return rec


def read_records(path):
    """The records in the --out file ``path`` (a JSON list), or none if there is no such file."""
    return json.loads(Path(path).read_text()) if path and Path(path).exists() else []


def append_record(args, rec):
    """Add ``rec`` to --out, if given; under torchrun only the first process writes."""
    if args.out and args.process == 0:
        Path(args.out).write_text(json.dumps(read_records(args.out) + [rec], indent=1))


SAVED_SETTINGS = ("method", "groups", "rank", "alpha", "basis_scale", "grow_from", "model", "img_size", "depth",
                  "dataset", "mean", "std")


def evaluate_adapter(args, data, state):
    """Load a --save file's adapters and head onto the pretrained model (args already hold its settings)."""
    model, _ = build_model(args)
    try:
        nora.load_adapter(model, state)
    except ValueError as e:
        sys.exit(f"error: {args.eval_adapter}: {e}")
    acc = evaluate(model, data[2], data[3], input_pipeline(args), args.batch_size, args.amp)
    print(f"RESULT eval-adapter {args.eval_adapter}: method={args.method} accuracy={acc:.2f}%")
    if args.plot_activations and args.process == 0:
        plot_activations(model, args.plot_activations)
    return dict(accuracy=acc)


def run(args, data):
    try:
        model, result = train(args, data)
    except Diverged as e:
        sys.exit(f"error: {e}")
    if args.save and args.process == 0:
        state = nora.adapter_state_dict(model)
        torch.save({"args": {k: v for k, v in vars(args).items() if k not in ("device", "process", "world")},
                    "state": state}, args.save)
        print(f"saved adapter and head ({sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor)):,} numbers) to {args.save}")
    if args.plot_activations and args.process == 0:
        plot_activations(model, args.plot_activations)
    return record(args, result)


def plot_activations(model, path, x_range=8.0):
    """Two panels per learned rational activation: each group's function after fine-tuning (colours)
    against GELU (grey, dashed), and its difference from GELU, over the base rational's fit range."""
    x = torch.linspace(-x_range, x_range, 161)
    panels = []
    for name, m in model.named_modules():
        if isinstance(m, (nora.NoRA, nora.GroupRational)):
            y = group_curves(m, x)
            colours = [hue(300 * g / y.shape[1]) for g in range(y.shape[1])]
            layer = name.replace(".mlp.act", "")
            panels.append((layer, [(x, F.gelu(x), "#888", True)] + [(x, y[:, g], c, False) for g, c in enumerate(colours)]))
            panels.append((f"{layer}: minus GELU", [(x, y[:, g] - F.gelu(x), c, False) for g, c in enumerate(colours)]))
    if not panels:
        print(f"--plot-activations: {model.__class__.__name__} has no rational activations to draw; nothing written")
        return
    write_svg(path, panels)
    print(f"wrote {path}: {len(panels) // 2} layers, every group's activation against GELU (dashed)")


# --- the paper's tables ----------------------------------------------------------------------

def table(args, data):
    name, col = args.table, 0 if args.dataset == "cifar10" else 1
    rows = []
    for entry in TABLES[name]:
        run_args = argparse.Namespace(**vars(args))
        if name == "groups":
            run_args.method, run_args.rank, run_args.grow_from, run_args.groups = "nora", 3, 8, entry
        else:
            run_args.method = entry
        res = run(run_args, data)
        paper = PAPER[name].get(entry, (None, None))[col]
        rows.append(f"| {entry} | {res['trainable']:,} ({res['percent']:.2f}%) | {res['accuracy']:.2f} | "
                    f"{'-' if paper is None else f'{paper:.2f}'} | {res['seconds']:.0f} |")
    label = "groups (rank 3)" if name == "groups" else "method"
    text = (f"\n{name} on {args.dataset}, --scale {args.scale} ({args.img_size} px, {args.epochs} epochs, "
            f"{args.train_subset or 'all'} train / {args.test_subset or 'all'} test images):\n\n"
            f"| {label} | trainable params (incl. head) | accuracy (%) | paper (%) | seconds |\n|---|---|---|---|---|\n"
            + "\n".join(rows))
    if name == "ablation":
        text += ("\n\nGELU-init tuning (Table 4) is the 'rational' row here: our rationals always start from GELU."
                 "\n'nora-group' is the paper text's per-group low-rank form; 'nora' the released code's shared form.")
    write_table(args, name, text)


# --- is NoRA worth it? each method at its own best learning rate ------------------------------

# Learning rates tried per method in --table study; each method's best is chosen on a validation
# split carved from the training set (never on the test set), then run again with more seeds.
# The head's lr is chosen first (row 'head'); every other method keeps the head at that lr and
# sweeps the lr of its own parameters (nora.param_groups); nora++ keeps NoRA at row 'nora's lr
# and sweeps LoRA's.
STUDY = {
    "head": (3e-3, 1e-2, 3e-2),
    "nora": (3e-3, 1e-2, 3e-2, 1e-1),
    "nora-monomial": (3e-4, 1e-3, 3e-3),
    "lora": (3e-4, 1e-3, 3e-3),
    "nora++": (3e-4, 1e-3, 3e-3),
    "full": (3e-6, 1e-5, 3e-5),
}
# --table stability: NoRA over its lr x group counts x ranks, the head at one lr, against head-only.
STABILITY = dict(lrs=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2), groups=(8, 16, 32, 64), ranks=(2, 3))
COLLAPSE = 5.0      # points below head-only that count as a collapse (a validation image is ~0.4 points)


def fmt(accuracy):
    return "diverged" if accuracy is None else f"{accuracy:.1f}"


def mean_sd(accuracies):
    """(mean, population sd) over seeds; a diverged run (None) counts as 0."""
    a = torch.tensor([0.0 if t is None else t for t in accuracies])
    return a.mean().item(), a.std(unbiased=False).item() if len(a) > 1 else 0.0


def spread(accuracies):
    return "{:.1f} +- {:.1f}".format(*mean_sd(accuracies))


def split_validation(x, y, fraction):
    """(train_x, train_y, val_x, val_y): a class-balanced validation split carved from the training
    set, the same for every seed (seed 12345), so that all runs are chosen on the same images."""
    val = torch.zeros(len(y), dtype=torch.bool)
    val[balanced_subset(y, max(1, round(fraction * len(y))), 12345)] = True
    return x[~val], y[~val], x[val], y[val]


# Settings that make two runs the same run: a sweep finds a run already in --out by these and
# reads it back instead of training it again, so an interrupted table resumes where it stopped.
RUN_SETTINGS = SAVED_SETTINGS + ("lora_rank", "lr", "head_lr", "nora_lr", "weight_decay", "weights", "epochs", "steps", "batch_size", "train_subset", "test_subset", "val_fraction", "seed")


def trial(args, split, test=None, train_now=True, **changes):
    """One run of a sweep (study, stability, frontier): train on the validation split's training
    part with ``changes`` applied to args; its record, with 'validation' and 'test' accuracies (None
    when the loss stopped being finite; 'test' also when ``test`` is None). A run already in --out
    is read back; one that is not is trained, or with ``train_now=False`` returned as None."""
    run_args = argparse.Namespace(**{**vars(args), **changes})
    key = json.loads(json.dumps({k: getattr(run_args, k) for k in RUN_SETTINGS}))   # as JSON has it: tuples as lists
    for rec in read_records(args.out):
        if "validation" in rec and {k: rec.get(k) for k in RUN_SETTINGS} == key and (test is None or rec["test"] is not None
                                                                                     or rec["validation"] is None):
            return rec
    if not train_now:
        return None
    try:
        model, result = train(run_args, split, eval_name="validation")
        result["validation"] = result["accuracy"]
        result["test"] = None if test is None else evaluate(model, *test, input_pipeline(run_args), args.batch_size, args.amp)
    except Diverged as e:
        print(f"  diverged: {e}")
        result = dict(validation=None, test=None)
    rec = {**key, **result, "table": args.table}
    print(f"RESULT {run_args.method} lr {run_args.lr:g} seed {run_args.seed}: validation {fmt(rec['validation'])}"
          + ("" if test is None else f", test {fmt(rec['test'])}"), flush=True)
    append_record(args, rec)
    return rec


def score(rec):
    """A run's validation accuracy, a run whose loss stopped being finite counting as worst."""
    return -1 if rec["validation"] is None else rec["validation"]


def best_lr(runs):
    """The lr of {lr: record} with the best validation accuracy; on a tie, the first."""
    return max(runs, key=lambda lr: score(runs[lr]))


def choose_lr(args, split, method, lrs, test=None, train_now=True, **changes):
    """``method`` at each lr, scored on validation: (best lr, {lr: record}); the best is None where a
    run is missing (``train_now=False``)."""
    runs = {lr: trial(args, split, test, train_now, method=method, lr=lr, **changes) for lr in lrs}
    return (None if None in runs.values() else best_lr(runs)), runs


def study(args, data):
    train_x, train_y, test_x, test_y = data
    split = split_validation(train_x, train_y, args.val_fraction)
    seeds = list(range(args.seed, args.seed + args.seeds))
    rows, ran, head_lr, nora_lr = [], [], args.head_lr, args.nora_lr
    for method, lrs in STUDY.items():
        if (method == "head" and head_lr) or (args.rows and method not in args.rows):   # --head-lr / --rows given
            continue
        ran.append(method)
        own = dict(head_lr=head_lr, nora_lr=nora_lr if method == "nora++" else None)
        best, runs = choose_lr(args, split, method, lrs, (test_x, test_y), seed=seeds[0], **own)
        tests = [runs[best]["test"]] + [trial(args, split, (test_x, test_y), method=method, lr=best, seed=seed, **own)["test"]
                                        for seed in seeds[1:]]     # more seeds at the chosen lr, scored on test
        rows.append(f"| {method} | " + ", ".join(f"{lr:g}: {fmt(runs[lr]['validation'])}" for lr in lrs)
                    + f" | {best:g} | {spread(tests)} | " + ", ".join(fmt(t) for t in tests) + " |")
        print("\n".join(rows), flush=True)
        head_lr = head_lr or best                         # the first row is 'head'
        nora_lr = nora_lr or (best if method == "nora" else None)   # NoRA++ keeps NoRA's lr from row 'nora'

    source = "--nora-lr" if args.nora_lr else "the nora row's chosen lr"
    nora_note = f"; in nora++, NoRA's parameters train at {source} ({nora_lr:g})" if "nora++" in ran else ""
    write_table(args, "study", f"""
Each method at its own best learning rate, chosen on a validation split of {len(split[2])} training images
({len(split[0])} left to train on); test accuracy ({len(test_y)} images) at that lr over seeds {seeds}
(mean +- spread, the population standard deviation). {describe(args)}

The head trains at {'--head-lr' if args.head_lr else "the head-only row's chosen lr"} ({head_lr:g}) in every other row{nora_note}.

| method | validation accuracy (%) at each lr, seed {seeds[0]} | chosen lr | test accuracy (%) | per seed |
|---|---|---|---|---|
""" + "\n".join(rows))


def stability(args, data):
    """NoRA's validation accuracy over its own lr x G x r, the head at one lr throughout (--head-lr,
    or the head-only best of STUDY['head'] chosen first), against head-only at that lr."""
    train_x, train_y, _, _ = data
    split = split_validation(train_x, train_y, args.val_fraction)
    if args.head_lr:
        head_lr, head = args.head_lr, trial(args, split, method="head", lr=args.head_lr)["validation"]
    else:
        head_lr, runs = choose_lr(args, split, "head", STUDY["head"])
        head = runs[head_lr]["validation"]
    lrs, rows = STABILITY["lrs"], []
    grid = [("nora", groups, rank) for rank in STABILITY["ranks"] for groups in STABILITY["groups"]]
    for method, groups, rank in grid + [("nora-monomial", 8, 2), ("nora-monomial", 64, 3)]:   # + the paper's basis
        accs = [trial(args, split, method=method, lr=lr, head_lr=head_lr, groups=groups, rank=rank)["validation"]
                for lr in lrs]
        name = "NoRA" if method == "nora" else "NoRA, paper's monomial basis,"
        rows.append(f"| {name} G = {groups}, r = {rank} | " + " | ".join(
            fmt(a) + (" **collapse**" if a is None or a < (head or 0) - COLLAPSE else "") for a in accs) + " |")
        print(rows[-1], flush=True)
    write_table(args, "stability", f"""
Validation accuracy (%) of NoRA over the lr of its own parameters (columns), group counts and ranks;
the head trains at lr {head_lr:g} in every run. Head-only training at that lr: {fmt(head)}.
**collapse** marks a run more than {COLLAPSE} points below head-only. {describe(args)}

| | """ + " | ".join(f"lr {lr:g}" for lr in lrs) + " |\n" + "|---" * (len(lrs) + 1) + "|\n" + "\n".join(rows))


# --- the frontier: accuracy against trainable parameters (the paper's claim) --------------------

# Each family's lr is chosen on validation at one size ('choose') and checked at its smallest and
# largest ('check': the chosen lr and its neighbours, grown at an edge like the choice); a checked
# size runs at the lr its check chose, every other size at the family's, over --seeds seeds, scored
# on test (every size choosing its own would be three times the runs). The head's lr is chosen with
# it: a head trained on features that move wants a lower lr than on frozen ones (LoRA r = 8 lost 6
# test points with its head at the head-only lr), so LoRA and NoRA try their head at the head
# family's lr and one step below, and a step further down while the lowest wins; both went down to
# 0.01, the lowest that search allows, so the other families train their head at that lr
# ('head_lr': one grid, not four, which kept them within 2 cores' reach).
# NoRA++'s NoRA part trains at the nora family's lr. Sizes are changes to flags.
FRONTIER = {
    "head": dict(method="head", lrs=(3e-3, 1e-2, 3e-2, 1e-1), choose={}, check=[], sizes=[{}]),
    "lora": dict(method="lora", lrs=(3e-4, 1e-3, 3e-3), choose=dict(lora_rank=8), check=[dict(lora_rank=1)],
                 sizes=[dict(lora_rank=r) for r in (1, 2, 4, 8)]),
    "nora": dict(method="nora", lrs=(3e-3, 1e-2, 3e-2), choose=dict(groups=8, rank=2),
                 check=[dict(groups=8, rank=1), dict(groups=64, rank=4)],
                 sizes=[dict(groups=g, rank=r) for r in (2, 1, 4) for g in (8, 16, 32, 64)]),   # (run order)
    "full": dict(method="full", lrs=(3e-6, 1e-5, 3e-5), choose={}, check=[], sizes=[{}], head_lr=HEAD_LR),
    "nora++": dict(method="nora++", lrs=(3e-4, 1e-3, 3e-3), choose={}, check=[], sizes=[{}], head_lr=HEAD_LR),
    "vpt": dict(method="vpt", lrs=(1e-3, 5e-3, 2e-2), choose={}, check=[], sizes=[{}], head_lr=HEAD_LR),
    "nora-group": dict(method="nora-group", lrs=(3e-3, 1e-2, 3e-2), choose=dict(groups=8, rank=2),
                       check=[dict(groups=64, rank=2)], sizes=[dict(groups=8, rank=2), dict(groups=64, rank=2)],
                       head_lr=HEAD_LR),
}


def frontier(args, data, train_now=True):
    """Every FRONTIER family and size at its validation-chosen lrs over seeds: a table, and with
    --plot an SVG of test accuracy against trainable backbone parameters. Runs go to --out as they
    finish and are read back from there, so an interrupted table resumes, and ``train_now=False``
    (--plot without --table) redraws from --out alone. The work is ordered so that an early stop
    leaves the most: every family's lrs first, then seed 0 at every size (the checked ends first),
    the lr checks, and the other seeds, one seed at every point before the next."""
    families = [f for f in FRONTIER if not args.rows or f in args.rows]
    split, test = (None, None) if data is None else (split_validation(data[0], data[1], args.val_fraction), data[2:])
    seeds = list(range(args.seed, args.seed + args.seeds))
    lr, head_lr, grids = {}, {}, {}                    # family -> its lr, its head's lr; (family, head lr) -> runs

    def run(f, x, seed, size, h=None):                 # h: the head's lr, the family's unless given
        return trial(args, split, test, train_now, method=FRONTIER[f]["method"], lr=x, seed=seed, head_lr=h or head_lr.get(f),
                     nora_lr=lr.get("nora") if f == "nora++" else None, **size)

    def grown(f, lrs, size, h=None):
        """({lr: run} at seed 0, the best lr) of family ``f`` at ``size`` with its head at ``h``: the
        grid ``lrs``, grown by a step (1, 3, 10, 30 ladder) where the best is at an edge, at most
        twice; the best is None where a run is missing."""
        lrs, start = list(lrs), len(lrs)
        while True:
            runs = {x: run(f, x, seeds[0], size, h) for x in lrs}
            if None in runs.values():
                return runs, None
            best = best_lr(runs)
            if best not in (lrs[0], lrs[-1]) or len(lrs) == start + 2:
                return runs, best
            lrs.insert(0, next_lr(best, up=False)) if best == lrs[0] else lrs.append(next_lr(best, up=True))

    def choose(f, h):                                  # the family's lr at its 'choose' size with its head at h
        grids[f, h], best = grown(f, FRONTIER[f]["lrs"], FRONTIER[f]["choose"], h)
        return best

    for f in families:                                 # 1. each family's lr and its head's, at its 'choose' size
        top = lambda h: max(map(score, grids[f, h].values()))   # best validation with the head at h
        if f == "head" or "head_lr" in FRONTIER[f]:    # the head family (its lr is its head's) or a head lr given: one grid
            heads = [FRONTIER[f].get("head_lr")]
            best = {heads[0]: choose(f, heads[0])}
        else:                                          # the head family's lr and a step below, lower while it wins
            heads, best = [next_lr(lr["head"], up=False), lr["head"]], {}
            while True:
                best.update({h: choose(f, h) for h in heads if h not in best})
                if None in best.values() or max(heads, key=top) != heads[0] or len(heads) == 4:
                    break
                heads.insert(0, next_lr(heads[0], up=False))
        if None in best.values():
            break                                      # (not trained yet) the later families need the head's lr
        head_lr[f] = max(heads, key=top)
        lr[f] = best[head_lr[f]]
    chosen = [f for f in families if f in lr]
    for key in ("check", "sizes"):                     # 2. seed 0 at every size, the checked ends first
        for f in chosen:
            for size in FRONTIER[f][key]:
                run(f, lr[f], seeds[0], size)
    checks = {(f, " ".join(filter(None, [size_name(FRONTIER[f]["choose"]), "(chosen here)", h and f"with the head at {h:g}"]))):
              runs for (f, h), runs in sorted(grids.items(), key=lambda fh: (families.index(fh[0][0]), -(fh[0][1] or 0)))
              if f in chosen}                          # (the head's lrs from the top down)
    point_lr = {}                                      # (family, size) -> its lr where a check chose it
    for f in chosen:                                   # 3. the checked sizes choose their own lr, starting from
        lrs = sorted(grids[f, head_lr[f]])             # the family's and its neighbours on the grid as it grew
        i = lrs.index(lr[f])
        for size in FRONTIER[f]["check"]:
            checks[f, size_name(size)], point_lr[f, size_name(size)] = grown(f, lrs[max(0, i - 1):i + 2], size)
    lr_of = lambda f, size: point_lr.get((f, size_name(size)), lr[f])
    for s in seeds[1:]:                                # 4. the other seeds: each at every point before the next
        for f in chosen:
            for size in FRONTIER[f]["sizes"]:
                run(f, lr_of(f, size), s, size)
    in_order = lambda sizes: sorted(sizes, key=lambda z: tuple(z.values()))      # the table lists sizes in order
    points = {f: [(size, lr_of(f, size), [run(f, lr_of(f, size), s, size) for s in seeds]) for size in in_order(FRONTIER[f]["sizes"])]
              for f in chosen}                         # (read back)
    write_frontier(args, families, lr, head_lr, point_lr, checks, points, seeds)


# The paper's points (ViT-Tiny on CIFAR, 50 epochs), printed under the table.
PAPER_FRONTIER = """The paper's (ViT-Tiny, CIFAR, 50 epochs; no head-only row, so no gap closed can be computed):

| paper | trainable backbone params | CIFAR-10 (%) | CIFAR-100 (%) |
|---|---|---|---|
| NoRA, G = 8, r = 2 (Tables 1, 6) | 2.1K | 90.88 | 77.46 |
| NoRA, G = 8 to 64, r = 3 (Fig. 2) | ~13K to ~28K | ~92.2 to ~93.1 | ~77.6 to ~79.6 |
| NoRA, r = 1 to 4 (Fig. 3) | - | - | rises up to r = 3, flat beyond (no numbers in the text) |
| LoRA (Tables 1, 6) | 37K | 91.05 | 77.68 |
| full fine-tuning (Table 1) | 5.5M | 90.71 | 77.19 |"""


def frontier_gap(summary):
    """The goal's reading: how much of the head-to-LoRA (r = 8) gap each NoRA size closes, and with
    what fraction of LoRA's backbone parameters. ``summary``: {(family, size name): (mean, sd,
    seeds, backbone parameters)}."""
    head, lora = summary.get(("head", "")), summary.get(("lora", "r = 8"))
    if not (head and lora):
        return "Gap closed: needs the head and LoRA r = 8 rows."
    lines = [f"Gap closed: head {head[0]:.1f} ({head[2]} seeds), LoRA r = 8 {lora[0]:.1f} ({lora[2]} seeds, {lora[3]:,} backbone params).\n",
             "| NoRA size | backbone params, % of LoRA r = 8's | gap closed | seeds |", "|---|---|---|---|"]
    for (f, name), (m, _, n, count) in summary.items():
        if f in ("nora", "nora-group"):
            lines.append(f"| {f} {name} | {100 * count / lora[3]:.1f}% | {100 * (m - head[0]) / (lora[0] - head[0]):.0f}% | {n} |")
    return "\n".join(lines)


def plot_frontier(path, curves, head):
    """Test accuracy (mean, bars: +- sd over seeds) against trainable backbone parameters on a log
    axis, one colour per family, a line through each family's frontier (the sizes that beat every
    smaller one); head-only (no backbone parameters) as a dashed line."""
    curves = [(name, c) for name, c in curves if name != "head" and c]
    pts = [p for _, c in curves for p in c]
    if not pts:
        print(f"--plot {path}: no finished runs in the results yet; nothing drawn")
        return
    W, H, ox, oy, pw, ph = 640, 400, 60, 20, 430, 330
    x0, x1 = math.log10(min(p[0] for p in pts)) - 0.2, math.log10(max(p[0] for p in pts)) + 0.2
    ys = [p[1] - p[2] for p in pts] + [p[1] + p[2] for p in pts] + ([head] if head is not None else [])
    y0, y1 = math.floor(min(ys) / 5) * 5, math.ceil(max(ys) / 5) * 5
    sx = lambda v: ox + (math.log10(v) - x0) / (x1 - x0) * pw
    sy = lambda v: oy + ph - (v - y0) / max(y1 - y0, 1e-9) * ph
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<rect width="100%" height="100%" fill="white"/><rect x="{ox}" y="{oy}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
           f'<text x="{ox + pw / 2}" y="{H - 8}" text-anchor="middle">trainable backbone parameters (log scale)</text>',
           f'<text x="14" y="{oy + ph / 2}" transform="rotate(-90 14 {oy + ph / 2})" text-anchor="middle">test accuracy (%)</text>']
    for e in range(math.ceil(x0), math.floor(x1) + 1):
        out.append(f'<text x="{sx(10 ** e):.1f}" y="{oy + ph + 14}" text-anchor="middle">1e{e}</text>')
    for v in range(y0, y1 + 1, 5):
        out.append(f'<text x="{ox - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{v}</text>')
    if head is not None:
        out.append(f'<line x1="{ox}" x2="{ox + pw}" y1="{sy(head):.1f}" y2="{sy(head):.1f}" stroke="#888" stroke-dasharray="4 3"/>')
        out.append(f'<text x="{ox + pw + 8}" y="{sy(head) + 4:.1f}" fill="#888">head only</text>')
    for k, (name, c) in enumerate(curves):
        colour = hue(k * 360 / 7)
        out.append(f'<text x="{ox + pw + 8}" y="{oy + 12 + 14 * k}" fill="{colour}">{name}</text>')
        front = []                                     # the family's frontier: the sizes that beat every smaller one
        for p in sorted(c):
            if not front or p[1] > front[-1][1]:
                front.append(p)
        if len(front) > 1:
            out.append(f'<polyline points="{" ".join(f"{sx(x):.1f},{sy(m):.1f}" for x, m, _ in front)}" fill="none" '
                       f'stroke="{colour}" stroke-opacity="0.5"/>')
        for x, m, sd in sorted(c):
            out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(m - sd):.1f}" y2="{sy(m + sd):.1f}" stroke="{colour}"/>'
                       f'<circle cx="{sx(x):.1f}" cy="{sy(m):.1f}" r="3" fill="{colour}"/>')
    Path(path).write_text("\n".join(out + ["</svg>"]) + "\n")
    print(f"wrote {path}: {len(pts)} points")


def next_lr(x, up):
    """The next lr beyond ``x`` on the 1, 3, 10, 30 ladder: where the best lr is at the edge of the
    grid, the frontier tries one step further rather than take an edge as the best."""
    k = math.floor(math.log10(x) + 1e-9)
    m = x / 10 ** k
    return float(f"{(3 if m < 2 else 10) * 10 ** k if up else (1 if m >= 2 else 0.3) * 10 ** k:.1g}")


def size_name(size):
    return ", ".join(f"{k.replace('lora_rank', 'r').replace('groups', 'G').replace('rank', 'r')} = {v}"
                     for k, v in size.items())


def write_frontier(args, families, lr, head_lr, point_lr, checks, points, seeds):
    rows, summary = [], {}                             # summary: (family, size) -> (mean, sd, seeds, backbone)
    lrs = lambda f, x: ("-" if x is None else f"{x:g}") + ("" if head_lr[f] is None else f", head {head_lr[f]:g}")
    for f in families:
        if f not in lr:
            rows.append(f"| {f} | - | lr not chosen yet | | | |")
            continue
        for size, x, recs in points[f]:
            done = [r for r in recs if r is not None]
            tests = [r["test"] for r in done]
            count = done[0].get("backbone") if done else None
            rows.append(f"| {f + ' ' + size_name(size) if size else f} | {'-' if count is None else f'{count:,}'} | {lrs(f, x)} | "
                        + (f"{spread(tests)} | " + ", ".join(fmt(t) for t in tests) if done else "not run yet |")
                        + f" | {len(done)} of {len(seeds)} |")
            if count is not None:
                summary[f, size_name(size)] = (*mean_sd(tests), len(done), count)
    gap = frontier_gap(summary)
    check_rows = [f"| {f} {name} | " + ", ".join(f"{x:g}: {'-' if r is None else fmt(r['validation'])}" for x, r in runs.items())
                  + f" | {lrs(f, point_lr.get((f, name), lr[f]))} |" for (f, name), runs in checks.items()]
    write_table(args, "frontier", f"""
Test accuracy against trainable backbone parameters (the head's parameters not counted, as in the paper),
every family at its own lr and its own head lr: chosen on a validation split at one size (seed {seeds[0]}),
checked at the family's smallest and largest size (second table), where a size that prefers another lr
runs at its own; then every size over seeds {seeds} (mean +- population sd of the test accuracy). {describe(args)}

| family and size | trainable backbone params | lr, head's lr | test accuracy (%) | per seed | seeds run |
|---|---|---|---|---|---|
""" + "\n".join(rows) + """

Validation accuracy (seed 0) at each lr where the family's lrs were chosen (the head at the head family's
lr and a step below it, a further step down while the lowest wins, at most twice), and the check at its
smallest and largest sizes. A best lr at the edge of the grid makes the grid grow by a step
(1, 3, 10, 30 ladder), at most twice:

| family and size | validation accuracy (%) at each lr | lr chosen, head's lr |
|---|---|---|
""" + "\n".join(check_rows) + "\n\n" + gap + "\n\n" + PAPER_FRONTIER)
    if args.plot:
        curves = [(f, [(count, m, sd) for (g, _), (m, sd, _, count) in summary.items() if g == f]) for f in families]
        plot_frontier(args.plot, curves, summary.get(("head", ""), (None,))[0])


def describe(args):
    steps = f"{args.steps} steps" if args.steps else f"{args.epochs} epochs"
    return (f"{args.img_size} px, {steps}, batch {args.batch_size}, weights {Path(str(args.weights or args.model)).name}, "
            f"NoRA basis_scale {args.basis_scale or BASIS_SCALE:g}.")


def write_table(args, name, text):
    print(text)
    md = Path(f"table-{name}-{args.dataset}-{args.scale}.md")
    if args.process == 0:
        md.write_text(text.lstrip() + "\n")
    print(f"\nwrote {md}" + (f"; every run's record is in {args.out}" if args.out else ""))


# --- efficiency (paper Table 6, extended) ------------------------------------------------------

def released_rational(x, numerator, denominator):
    """The released code's pure-PyTorch group rational, for comparison only: stack x^0 .. x^5 and
    multiply each group's coefficients in with bmm (keeps the stacked powers for backward)."""
    G, C = numerator.shape[0], x.shape[-1]
    xg = x.reshape(-1, G, C // G).permute(1, 0, 2).reshape(G, 1, -1)            # (G, 1, N*D)
    powers = torch.cat([xg ** i for i in range(numerator.shape[1])], dim=1)     # (G, 6, N*D)
    P = torch.bmm(numerator.unsqueeze(1), powers)
    S = torch.bmm(denominator.unsqueeze(1), powers[:, 1:denominator.shape[1] + 1])
    y = (P / (1 + S.abs())).reshape(G, -1, C // G).permute(1, 0, 2)
    return y.reshape(x.shape)


def horner_autograd(x, numerator, denominator):
    """Eq. 6 by Horner's rule with autograd doing the backward, for comparison only."""
    G, C = numerator.shape[0], x.shape[-1]
    xg, a, b = x.reshape(-1, G, C // G), numerator.unsqueeze(-1), denominator.unsqueeze(-1)
    P, s = a[:, -1], b[:, -1]
    for i in range(numerator.shape[1] - 2, -1, -1):
        P = P * xg + a[:, i]
    for j in range(denominator.shape[1] - 2, -1, -1):
        s = s * xg + b[:, j]
    return (P / (1 + (s * xg).abs())).reshape(x.shape)


def timed(fn, device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def interleaved_medians(candidates, repeats, device, warmup=1):
    """Median seconds of each callable, run round-robin (so drifts in machine speed hit all alike)."""
    times = {k: [] for k in candidates}
    for r in range(warmup + repeats):
        for k, fn in candidates.items():
            dt, _ = timed(fn, device)
            if r >= warmup:
                times[k].append(dt)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def saved_bytes(fn):
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs its forward."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def time_activations(dev, reps):
    """Table rows: GELU and three ways to compute the rational on a ViT-Tiny MLP's hidden activations."""
    # a ViT-Tiny MLP's hidden activations for 16 images, G = 8
    x0 = torch.randn(16, 197, 768, device=dev)
    num, den = (torch.tensor(c, device=dev).repeat(8, 1) for c in nora.GELU_COEFFS)
    ops = {"GELU": lambda x, n, d: F.gelu(x), "released-style rational (powers + bmm)": released_rational,
           "Horner under autograd": horner_autograd, "ours, eager": nora.rational, "ours, compiled": nora.rational}

    def op_step(fn, backward):
        x, n, d = (t.clone().requires_grad_(backward) for t in (x0, num, den))
        y = fn(x, n, d)
        if backward:
            y.backward(torch.ones_like(y))
    rows = {}
    for compiled in (False, True):
        if compiled and not nora.use_compiled_rational():
            break
        names = [k for k in ops if (k == "ours, compiled") == compiled]
        print(f"timing the activation alone: {', '.join(names)}", flush=True)
        fwd = interleaved_medians({k: (lambda f=ops[k]: op_step(f, False)) for k in names}, reps, dev)
        both = interleaved_medians({k: (lambda f=ops[k]: op_step(f, True)) for k in names}, reps, dev)
        for k in names:
            x, n, d = (t.clone().requires_grad_() for t in (x0, num, den))
            rows[k] = (fwd[k], both[k], saved_bytes(lambda: ops[k](x, n, d))[1])
        nora.use_compiled_rational(False)
    g = rows["GELU"]
    return (["| activation on (16, 197, 768), G = 8 | forward ms | x GELU | forward + backward ms | x GELU "
             "| saved for backward (MB) |\n|---|---|---|---|---|---|"]
            + [f"| {k} | {f * 1e3:.2f} | {f / g[0]:.2f} | {b * 1e3:.2f} | {b / g[1]:.2f} | {m / 2**20:.1f} |"
               for k, (f, b, m) in rows.items()])


def full_size_bytes(tensors, numel):
    """(how many, total bytes) of the tensors in the nested ``tensors`` with at least ``numel`` elements."""
    big = [t for t in torch.utils._pytree.tree_leaves(tensors) if isinstance(t, torch.Tensor) and t.numel() >= numel]
    return len(big), sum(t.numel() * t.element_size() for t in big)


class MemoryTraffic(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ATen ops that read or write a tensor of at least ``numel`` elements (a pass over
    the activation), and the bytes of all such tensors they touch."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.passes, self.bytes = numel, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        count, size = full_size_bytes((args, kwargs, out), self.numel)
        self.passes += bool(count)
        self.bytes += size
        return out


def memory_traffic(dev):
    """Table rows: the passes over memory of the rational's eager forward and backward, and the bytes
    they move per activation element, against GELU's: counted op by op as they run, so the same
    count on any device. The compiled kernels are not visible op by op; for them the table gives
    the number of kernels inductor generated and the bytes of their inputs and outputs, which
    they read and write at least once (a lower bound, reached when everything fuses)."""
    x = torch.randn(16 * 197, 768, device=dev)
    num, den = (torch.tensor(c, device=dev).repeat(8, 1) for c in nora.GELU_COEFFS)
    ops = {"GELU": (lambda: F.gelu(x), lambda: torch.ops.aten.gelu_backward(x, x)),
           "ours, eager": (lambda: nora._rational_forward(x, num, den), lambda: nora._rational_backward(x, num, den, x))}
    lines = ["| pass over (3152, 768) float32 | forward: passes | bytes / element | backward: passes | bytes / element |",
             "|---|---|---|---|---|"]
    for name, (forward, backward) in ops.items():
        counts = []
        for fn in (forward, backward):
            with MemoryTraffic(x.numel()) as t:
                fn()
            counts += [t.passes, t.bytes / x.numel()]
        lines.append(f"| {name} | {counts[0]} | {counts[1]:.0f} | {counts[2]} | {counts[3]:.0f} |")
    try:
        import torch._inductor.metrics as metrics
        cells = []
        for kernel, args in ((nora._rational_forward, (x, num, den)), (nora._rational_backward, (x, num, den, x))):
            torch._dynamo.reset()
            metrics.reset()
            out = torch.compile(kernel, dynamic=False)(*args)
            size = full_size_bytes((args, out), x.numel())[1]   # what the kernels read and write at least once
            cells += [f"{metrics.generated_kernel_count} kernel(s)", f">= {size / x.numel():.0f}"]
        lines.append(f"| ours, compiled | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    except Exception as e:                                # no compiler: the eager rows stand alone
        lines.append(f"| ours, compiled | not available ({type(e).__name__}) | - | - | - |")
    return lines + [""]


def time_models(dev, reps, B, amp):
    """Table rows: ViT-Tiny with a frozen backbone under LoRA, NoRA and NoRA++: one training step and inference."""
    x = torch.randn(B, 3, 224, 224, device=dev)
    y = torch.randint(0, 10, (B,), device=dev)

    def model_for(method):
        torch.manual_seed(0)
        m = prepare(nora.VisionTransformer("tiny", num_classes=10), method, groups=8, rank=2).to(dev)
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    def train_step(model, opt):
        with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer(model):
        model.eval()
        with torch.no_grad(), torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
            model(x)
        model.train()

    from torch.utils.flop_counter import FlopCounterMode
    results = {}
    for compiled in (False, True):
        if compiled and not nora.use_compiled_rational():
            break
        tag = "compiled" if compiled else "eager"
        methods = {"LoRA": "lora", f"NoRA, {tag}": "nora", f"NoRA++, {tag}": "nora++"}
        models = {k: model_for(m) for k, m in methods.items()}
        print(f"timing ViT-Tiny training steps and inference ({tag}), {reps + 1} rounds", flush=True)
        steps = interleaved_medians({k: (lambda mo=mo: train_step(*mo)) for k, mo in models.items()}, reps, dev)
        merged = {"GELU model": model_for("head")[0], f"NoRA merged, {tag}": nora.merge(model_for("nora")[0])}
        inference = interleaved_medians({k: (lambda m=m: infer(m)) for k, m in {**merged, **{k: v[0] for k, v in models.items()}}.items()}, reps, dev)
        for k, (m, opt) in models.items():
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                train_step(m, opt)
                memory = torch.cuda.max_memory_allocated()
            else:
                memory = saved_bytes(lambda: F.cross_entropy(m(x), y))[1]
            with FlopCounterMode(display=False) as fc:
                infer(m)
            trainable = sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and not n.startswith("head"))
            results[k] = dict(trainable=trainable, flops=fc.get_total_flops() / B, latency=inference[k] / B,
                              step=steps[k], memory=memory)
        for k, m in merged.items():
            results[k] = dict(trainable=0, flops=None, latency=inference[k] / B, step=None, memory=None)
        nora.use_compiled_rational(False)
    lora, gelu = results["LoRA"], results["GELU model"]
    mem = "peak memory (MB)" if dev.type == "cuda" else "saved for backward (MB)"
    lines = [f"\n| ViT-Tiny, batch {B}, 224 px | trainable (excl. head) | matmul GFLOPs / image | forward ms / image "
             f"| x GELU model | train step ms | x LoRA | {mem} | x LoRA |\n|---|---|---|---|---|---|---|---|---|"]
    for k, r in results.items():
        cells = [f"{r['trainable']:,}", "-" if r["flops"] is None else f"{r['flops'] / 1e9:.3f}",
                 f"{r['latency'] * 1e3:.2f}", f"{r['latency'] / gelu['latency']:.2f}",
                 "-" if r["step"] is None else f"{r['step'] * 1e3:.0f}",
                 "-" if r["step"] is None else f"{r['step'] / lora['step']:.2f}",
                 "-" if r["memory"] is None else f"{r['memory'] / 2**20:.0f}",
                 "-" if r["memory"] is None else f"{r['memory'] / lora['memory']:.3f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("\nFLOPs: torch.utils.flop_counter (matmuls, convolution, attention; elementwise work such as "
                 "the activation is not counted). Memory on CPU: bytes of the distinct tensors autograd saves "
                 "for backward in one training step.")
    return lines


def efficiency(dev, reps, batch_size, amp):
    """Paper Table 6, extended: the activation alone against GELU, then whole ViT-Tiny models against LoRA."""
    lines = [f"Efficiency on {dev.type} ({torch.get_num_threads()} threads), median of {reps} interleaved repeats "
             f"after warm-up, torch {torch.__version__}.\n"]
    lines += memory_traffic(dev)
    lines += time_activations(dev, reps)
    lines += time_models(dev, reps, batch_size, amp)
    text = "\n".join(lines)
    print(text)
    md = Path(f"table-efficiency-{dev.type}.md")
    md.write_text(text + "\n")
    print(f"\nwrote {md}")


# --- baselines for the paper's tables -----------------------------------------------------------
#
# The comparisons of Tables 1, 3, 4 and 5 on the same frozen ViT, each as small as it can be:
# DoRA and QLoRA on the LoRA targets, VPT prompts, bottleneck adapters, other learnable
# activations, and the coefficient-tuning variants NoRA is compared with. `prepare` (the model
# section) puts any of them, or NoRA, on a model by name.

class DoRALinear(nora.LoRALinear):
    """DoRA: each adapted row is magnitude * direction, W' = m (W0 + B A) / ||W0 + B A||, with m
    trainable and starting at ||W0|| (so W' = W0 at step 0). As in the DoRA paper (Sec. 4.3)
    the norm is treated as a constant in backward. For (out, in) weights only (nn.Linear)."""

    def __init__(self, base, rank=8, alpha=16, row_ranges=None, fan_in_fan_out=False):
        if fan_in_fan_out:
            raise ValueError("DoRALinear: only for layers with an (out, in) weight, such as nn.Linear")
        super().__init__(base, rank, alpha, row_ranges)
        self.magnitude = nn.Parameter(base.weight.detach()[self.rows()].norm(dim=1))

    def rows(self):
        return torch.cat([torch.arange(a, b, device=self.lora_A.device) for a, b in self.row_ranges])

    @property
    def weight(self):
        if self.merged:
            return self.base.weight
        rows, w = self.rows(), super().weight              # W0 + B A on the adapted rows
        v = w[rows]
        return w.index_copy(0, rows, v * (self.magnitude / v.norm(dim=1).detach())[:, None])

    def forward(self, x):
        return F.linear(x, self.weight, self.base.bias)

    def unmerge(self):
        raise NotImplementedError("DoRA's merge rescales rows; it is not undone")


# The 16 levels of 4-bit NormalFloat (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
NF4_LEVELS = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])


class NF4Linear(nn.Module):
    """A frozen linear stored in 4 bits (QLoRA's NF4): each block of 64 weights keeps its absmax and
    a 4-bit index into NF4_LEVELS, two indices per byte. The weight is dequantised at every forward.
    (QLoRA also quantises the absmax values, "double quantisation"; we keep them in float32.)"""

    def __init__(self, linear, block_size=64):
        super().__init__()
        w = linear.weight.detach().float()
        if w.numel() % block_size:
            raise ValueError(f"NF4Linear: {w.numel()} weights do not split into blocks of {block_size}")
        blocks = w.reshape(-1, block_size)
        absmax = blocks.abs().amax(1, keepdim=True).clamp_min(1e-12)
        levels = NF4_LEVELS.to(w.device)
        codes = ((blocks / absmax).unsqueeze(-1) - levels).abs().argmin(-1).to(torch.uint8)
        self.register_buffer("codes", codes[:, 0::2] << 4 | codes[:, 1::2])
        self.register_buffer("absmax", absmax)
        self.register_buffer("levels", levels, persistent=False)   # on the layer's device: no copy per forward
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.shape = w.shape

    @property
    def weight(self):
        codes = torch.stack([self.codes >> 4, self.codes & 15], dim=-1).flatten(1).long()
        return (self.levels[codes] * self.absmax).view(self.shape)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class PromptTokens(nn.Module):
    """VPT-shallow (Jia et al. 2022): learnable tokens inserted after the class token, before the first block."""

    def __init__(self, num_tokens, dim):
        super().__init__()
        self.prompts = nn.Parameter(torch.randn(1, num_tokens, dim) * 0.02)

    def forward(self, x):
        return torch.cat([x[:, :1], self.prompts.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)


class Adapter(nn.Module):
    """Bottleneck adapter after a block (Houlsby et al. 2019): x + up(GELU(down(x))), up zero-initialised."""

    def __init__(self, dim, bottleneck=48):
        super().__init__()
        self.down, self.act, self.up = nn.Linear(dim, bottleneck), nn.GELU(), nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(self.act(self.down(x)))


class DeltaRational(nn.Module):
    """Frozen base coefficients plus a directly trained, zero-initialised update of the first
    ``num_terms`` numerator and ``den_terms`` denominator coefficients (Table 4): all of them
    is "zero-init tuning" (NoRA without the low-rank factorisation), (1, 0) is "const tuning" (a0)."""

    def __init__(self, groups=8, num_terms=6, den_terms=4, init="gelu"):
        super().__init__()
        base = nora.GroupRational(groups, init)
        self.register_buffer("numerator", base.numerator.detach())
        self.register_buffer("denominator", base.denominator.detach())
        self.delta_num = nn.Parameter(torch.zeros(groups, num_terms))
        self.delta_den = nn.Parameter(torch.zeros(groups, den_terms))

    def forward(self, x):
        pad = lambda d, full: F.pad(d, (0, full.shape[1] - d.shape[1]))
        return nora.rational(x, self.numerator + pad(self.delta_num, self.numerator),
                             self.denominator + pad(self.delta_den, self.denominator))


class LearnableELU(nn.Module):
    """ELU with a learnable alpha (Table 3)."""

    def __init__(self, alpha=1.0):
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha))

    def forward(self, x):
        return torch.where(x > 0, x, self.alpha * torch.expm1(x.clamp_max(0)))


class AReLU(nn.Module):
    """AReLU (Chen et al. 2020): (1 + sigmoid(beta)) x for x >= 0, clamp(alpha, 0.01, 0.99) x below (Table 3)."""

    def __init__(self, alpha=0.9, beta=2.0):
        super().__init__()
        self.alpha, self.beta = nn.Parameter(torch.tensor(alpha)), nn.Parameter(torch.tensor(beta))

    def forward(self, x):
        return torch.where(x >= 0, (1 + torch.sigmoid(self.beta)) * x, self.alpha.clamp(0.01, 0.99) * x)


# --- command line ------------------------------------------------------------------------------

def check_output_paths(p, save, out, plot, frontier_plot):
    """Fail before training, not after it, if a result could not be written."""
    for flag, path in (("--save", save), ("--out", out), ("--plot-activations", plot), ("--plot", frontier_plot)):
        if path is None:
            continue
        path = Path(path)
        if path.is_dir() or not path.parent.is_dir():
            p.error(f"{flag} {path}: {'is a folder' if path.is_dir() else 'its folder does not exist'}; "
                    f"give a file path in an existing folder")
    if out and Path(out).exists():
        try:
            ok = isinstance(json.loads(Path(out).read_text()), list)
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            p.error(f"--out {out} exists but is not a JSON list of results; pass another file or delete it")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=CIFAR)
    p.add_argument("--data-root", help="folder holding (or to receive) the CIFAR python-format folder")
    p.add_argument("--no-download", action="store_true", help="never download CIFAR; fail if it is not in --data-root")
    p.add_argument("--method", choices=METHODS)
    p.add_argument("--table", choices=[*TABLES, "study", "stability", "frontier", "efficiency"],
                   help="run every row of a paper table, or the lr study / stability grid / frontier (README)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="--table study/stability: validation split")
    p.add_argument("--seeds", type=int, default=3, help="--table study/frontier: seeds at each chosen lr")
    p.add_argument("--rows", type=lambda v: v.split(","),
                   help="--table study/frontier: only these rows (families), e.g. head,lora,nora")
    p.add_argument("--plot", help="--table frontier: draw it into this .svg; without --table, from --out's runs alone")
    p.add_argument("--scale", choices=SCALES, help="preset for the options below (default: paper)")
    p.add_argument("--groups", type=int)
    p.add_argument("--lora-rank", type=int, help="LoRA's rank (default 8; alpha = 2 x rank)")
    p.add_argument("--rank", type=int)
    p.add_argument("--alpha", type=float, help="NoRA alpha (default 2 * rank)")
    p.add_argument("--basis-scale", type=float,
                   help="NoRA learns its update in the basis (x/s)^i; s (default: nora.NoRA's; 1 is the paper's monomials)")
    p.add_argument("--grow-from", type=int, default=0, help="build NoRA with this many groups, then replicate to --groups")
    p.add_argument("--img-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--train-subset", type=int, help="class-balanced subset of the training set (0: all)")
    p.add_argument("--test-subset", type=int, help="class-balanced subset of the test set (0: all)")
    p.add_argument("--lr", type=float, help="default 1e-3 (VPT 5e-3, DoRA 5e-4, paper C.1)")
    p.add_argument("--head-lr", type=float, help="learning rate of the task head (default: --lr)")
    p.add_argument("--nora-lr", type=float, help="learning rate of NoRA's parameters when others train too (NoRA++)")
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--model", choices=nora.PRETRAINED,
                   help="pretrained ViT (a record in nora.PRETRAINED: size, patch, LayerScale, normalisation)")
    p.add_argument("--weights", help="its checkpoint: a file or URL (default: the --model's on the hub); 'none' for random")
    p.add_argument("--depth", type=int, default=None, help="use fewer blocks (quick experiments)")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision (on by default on CUDA)")
    p.add_argument("--no-compile", action="store_true",
                   help="run the rational's eager kernels instead of torch.compile'd ones (compiling takes seconds)")
    p.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default="float16",
                   help="autocast dtype on CUDA: float16 (with a gradient scaler, the paper's AMP) or bfloat16 "
                        "(no scaler needed; on Ampere and newer GPUs)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="--table efficiency: timed repeats per measurement")
    p.add_argument("--bench-batch", type=int, default=32, help="--table efficiency: batch size of the model rows")
    p.add_argument("--out", help="append a JSON record of every run to this file")
    p.add_argument("--save", help="write the adapters + head (and the settings) to this file")
    p.add_argument("--eval-adapter", help="load a --save file onto the pretrained model and evaluate it")
    p.add_argument("--plot-activations", help="after training, draw every layer's learned activations into this .svg")
    p.set_defaults(**DEFAULTS)
    args = p.parse_args(argv)
    for k, v in SCALES[args.scale].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for k in ("epochs", "batch_size", "log_every", "groups", "rank", "lora_rank", "img_size", "repeats", "bench_batch", "seeds"):
        if getattr(args, k) <= 0:
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    for k in ("steps", "depth", "alpha", "lr", "head_lr", "nora_lr", "basis_scale"):
        v = getattr(args, k)
        if v is not None and not (v > 0 and math.isfinite(v)):
            p.error(f"--{k} must be positive, got {v}")
    if args.table and (args.save or args.eval_adapter or args.plot_activations or args.method != p.get_default("method")):
        p.error("--table runs every row of a table: it cannot be combined with --save, --eval-adapter, "
                "--plot-activations or --method")
    if args.eval_adapter and not Path(args.eval_adapter).is_file():
        p.error(f"--eval-adapter: no file at {args.eval_adapter}")
    rows = {"study": STUDY, "frontier": FRONTIER}.get(args.table or ("frontier" if args.plot else None), {})
    if args.rows and (not rows or set(args.rows) - set(rows)):
        p.error(f"--rows goes with --table study or frontier and names their rows ({list(rows) or list(STUDY)}), got {args.rows}")
    if args.rows and "head" not in args.rows and not args.head_lr:
        p.error("--rows without 'head' needs --head-lr: every other row trains the head at the head row's lr")
    if args.rows and "nora++" in args.rows and "nora" not in args.rows and not args.nora_lr:
        p.error("--rows with nora++ but not nora needs --nora-lr: nora++ trains NoRA at the nora row's lr")
    if args.plot and args.table not in (None, "frontier"):
        p.error("--plot draws the frontier: use it with --table frontier or alone")
    check_output_paths(p, args.save, args.out, args.plot_activations, args.plot)
    args.device = torch.device(args.device)
    args.amp = getattr(torch, args.amp_dtype) if args.device.type == "cuda" and not args.no_amp else None
    args.mean, args.std = nora.PRETRAINED[args.model]["mean"], nora.PRETRAINED[args.model]["std"]
    args.process, args.world = 0, 1                     # this process's rank and the count (start_processes)
    if (args.table or args.plot) and args.out is None:
        args.out = "results.json"
    return args


def load_saved_run(path):
    """A --save file: {'args': the run's settings, 'state': nora.adapter_state_dict}. Loaded with
    weights_only=True, so a shared file cannot run code."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"error: {path} could not be read as a saved adapter ({type(e).__name__}: {e})")
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict) and isinstance(saved.get("args"), dict)
            and all(k in saved["args"] for k in SAVED_SETTINGS)):
        sys.exit(f"error: {path} is not a train_vit.py --save file (a bare nora.adapter_state_dict has no "
                 f"settings: load it in Python with nora.load_adapter onto a model built like the saved one)")
    return saved


def start_processes(args):
    """Under torchrun (which sets RANK, LOCAL_RANK, WORLD_SIZE): join the process group, NCCL on
    GPUs and gloo on CPUs, and take this process's GPU. Sets args.process (its rank) and
    args.world (0 and 1 without torchrun). Every process runs the same code on the same data, but
    only rank 0 evaluates (sending the result to the others, so that all take the same decisions,
    e.g. the study's lr), prints and writes."""
    args.process, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.world == 1:
        return
    if args.batch_size % args.world:
        sys.exit(f"error: --batch-size {args.batch_size} must be a multiple of the {args.world} processes")
    if args.device.type == "cuda":
        args.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(args.device)
    torch.distributed.init_process_group("nccl" if args.device.type == "cuda" else "gloo")


def main(argv=None):
    args = parse_args(argv)
    start_processes(args)
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    kernels = dict(nora._kernels)                       # eager or compiled rational, as the caller had it
    try:
        with contextlib.redirect_stdout(None) if args.process else contextlib.nullcontext():   # rank 0 prints
            torch.manual_seed(args.seed)
            if args.threads:
                torch.set_num_threads(args.threads)
            if args.device.type == "cpu":
                torch.use_deterministic_algorithms(True)
            else:                                       # TF32 matmuls for the float32 parts (--no-amp too)
                torch.set_float32_matmul_precision("high")
            if not args.no_compile and args.table != "efficiency":   # (the efficiency table times both paths)
                compiled = nora.use_compiled_rational(device=args.device)
                print(f"rational: {'compiled' if compiled else 'eager (torch.compile failed, see the warning)'}")
            return _main(args)
    finally:                                            # leave a Python caller's torch settings as they were
        if args.world > 1:
            torch.distributed.destroy_process_group()
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
        nora._kernels.update(kernels)


def _main(args):
    if args.table == "efficiency":
        return efficiency(args.device, args.repeats, args.bench_batch, args.amp)
    if args.plot and not args.table:                    # redraw the frontier from --out: no data, no training
        return frontier(args, None, train_now=False)
    if args.eval_adapter:                               # the saved run's settings pick the data too
        saved = load_saved_run(args.eval_adapter)
        for k in SAVED_SETTINGS:
            setattr(args, k, saved["args"][k])
        args.lora_rank = saved["args"].get("lora_rank", 8)              # (not saved before --lora-rank)
        args.weights = args.weights or saved["args"].get("weights")    # the checkpoint it was trained on
    train_x, train_y, test_x, test_y = load_cifar(args.dataset, args.data_root, not args.no_download)
    tr = balanced_subset(train_y, args.train_subset, args.seed)
    te = balanced_subset(test_y, args.test_subset, args.seed + 1)
    data = (train_x[tr], train_y[tr], test_x[te], test_y[te])
    if args.eval_adapter:
        return evaluate_adapter(args, data, saved["state"])
    if args.table in ("study", "stability", "frontier"):
        return {"study": study, "stability": stability, "frontier": frontier}[args.table](args, data)
    return table(args, data) if args.table else run(args, data)


if __name__ == "__main__":
    main()
