"""Fine-tune a pretrained ViT on CIFAR-10/100 with NoRA (or a baseline), and reproduce the paper's tables.

    python train_vit.py --groups 8 --rank 2                       # NoRA, the paper's protocol (appendix C)
    python train_vit.py --method lora --dataset cifar100 --scale small
    python train_vit.py --table methods --scale small             # Table 1 at laptop scale
    python train_vit.py --scale small --save a.pt                 # then: --eval-adapter a.pt
    python train_vit.py --scale small --plot-activations act.svg  # draw what NoRA learned
    torchrun --nproc_per_node 8 train_vit.py --groups 8 --rank 2 # data-parallel on 8 GPUs (DDP)

The method lives in nora.py; this script parses arguments, loads data, trains and prints. In order: defaults,
data, the model and the baselines' names, one training run, the paper's tables, the baselines themselves, the
command line. The lr studies and accuracy-per-parameter frontier are in dev/sweeps.py, kernel timings in dev/bench.py.
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
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import fit_gelu
import nora

try:
    import fcntl                                          # to lock --out (POSIX)
except ImportError:
    fcntl = None

# --- defaults: the paper's protocol (appendix C); every other default is in make_parser, with its flag.
SCALES = {  # --scale presets: 'paper' is appendix C (Table 7); 'small' finishes a table on a 2-core CPU
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
# With no --lr, the head and NoRA's update get lrs of their own, chosen on validation (dev/RESULTS.md): at the
# paper's one lr of 1e-3, a fresh head and NoRA's update in the (x/3)^i basis move too slowly to beat a tuned probe.
HEAD_LR = 1e-2    # with NoRA training: the lowest tried (0.3 .. 0.01) at 400 steps; a probe alone wants 0.3
NORA_LR = 3e-2    # with the head at 1e-2, chosen at 80, 400 and 2,000 steps (1e-1 collapsed at 80 and 400);
                  # that it suits the paper's 9,750 steps too extrapolates that flat trend: not measured
BASIS_SCALE = inspect.signature(nora.NoRA).parameters["basis_scale"].default    # nora.NoRA's s (3)


def learning_rates(args):
    """(lr, head lr, NoRA lr) of a run: the flags where given; else, with --lr given, every part at it (the paper's
    protocol); else HEAD_LR and NORA_LR (the paper's monomial basis keeps --lr: it wants a 30x smaller step)."""
    lr = args.lr if args.lr is not None else METHOD_LR.get(args.method, 1e-3)
    own = args.lr is None
    head = args.head_lr or (HEAD_LR if own else lr)
    ours = args.method != "nora-monomial" and args.basis_scale in (None, BASIS_SCALE)
    return lr, head, args.nora_lr or (NORA_LR if own and ours else lr)

PAPER = {  # the paper's numbers, printed beside ours
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
                    batch = CifarUnpickler(fh, encoding="latin1").load()
                data, labels = batch["data"], np.asarray(batch[key])
                if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
                        and data.shape[1] == 3072 and len(data) == len(labels) > 0):
                    raise ValueError(f"{getattr(data, 'dtype', type(data).__name__)} data of shape "
                                     f"{getattr(data, 'shape', '?')} for {len(labels)} labels; expected uint8 (N, 3072)")
                if labels.dtype.kind not in "iu" or labels.min() < 0 or labels.max() >= NUM_CLASSES[name]:
                    raise ValueError(f"labels must be integers in [0, {NUM_CLASSES[name]}), got {labels.dtype} "
                                     f"in [{labels.min()}, {labels.max()}]")
            except Exception as e:                    # truncated, empty, not a pickle, code in it, wrong keys or shapes
                sys.exit(f"error: {path / f} is not a valid {name} batch ({type(e).__name__}: {e}). {redo}")
            xs.append(data.reshape(-1, 3, 32, 32))
            ys.append(labels.astype(np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    return (*read(train_files), *read([test_file]))


class CifarUnpickler(pickle.Unpickler):
    """A pickle reader that builds only what a CIFAR batch holds (dicts, lists, strings, numbers and
    numpy arrays): any other class or function in the file is refused instead of run."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")} | {   # numpy 1's and 2's names
        (f"numpy.{core}.{module}", name) for core in ("core", "_core")
        for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"), ("numeric", "_frombuffer"))}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: a CIFAR batch holds no such thing")
        return super().find_class(module, name)


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
    """uint8 (B, 3, 32, 32) -> normalised float (B, 3, S, S) on ``device``, mirrored where ``flip`` (B,) says;
    ``mean``, ``std``: (3, 1, 1) on ``device``. The uint8 batch moves first: resizing on the CPU would starve a GPU."""
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
    """Set ``model`` (a VisionTransformer) up for fine-tuning with ``method`` (one of METHODS); its head trains.
    Table 4's variants have ``groups`` groups ('rational' tunes GELU-fitted coefficients, DeltaRational the rest);
    'nora-monomial' is NoRA in the paper's monomial basis (basis_scale=1). ``nora_kwargs`` go to every NoRA."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    nora.freeze(model)                                    # all of it; what is added below trains, and the head
    dim = model.cls_token.shape[-1]
    qv = {"qkv": [(0, dim), (2 * dim, 3 * dim)]}          # LoRA on q and v of the fused qkv (paper C.1)
    if method == "full":
        model.requires_grad_(True)
    elif method in ("lora", "dora", "qlora"):
        nora.add_lora(model, lora_rank, lora_alpha, rows=qv, layer=DoRALinear if method == "dora" else nora.LoRALinear)
        if method == "qlora":                             # every linear layer of the blocks in 4 bits, LoRA's bases too
            replace_modules(model.blocks, lambda m: type(m) is nn.Linear, NF4Linear)
    elif method == "vpt":
        model.blocks = nn.Sequential(PromptTokens(10, dim), *model.blocks)
    elif method == "adapter":
        model.blocks = nn.Sequential(*[nn.Sequential(block, Adapter(dim, 48)) for block in model.blocks])
    elif method.startswith("nora"):
        if method == "nora-monomial":
            nora_kwargs["basis_scale"] = 1.0
        nora.add_nora(model, groups, rank, example=example_input(model), alpha=alpha,
                      form="per_group" if method == "nora-group" else "shared", **nora_kwargs)
        if method in ("nora-num", "nora-den"):            # Table 5: adapt one side of the rational only
            fixed = "Q" if method == "nora-num" else "P"
            for m in (m for m in model.modules() if isinstance(m, nora.NoRA)):
                getattr(m, f"A_{fixed}").requires_grad_(False)
                getattr(m, f"B_{fixed}").requires_grad_(False)
        if method == "nora++":
            nora.add_lora(model, lora_rank, lora_alpha, rows=qv)
    elif method == "rational":
        replace_modules(model, lambda m: isinstance(m, nn.GELU), lambda m: GroupRational(groups))
    elif method in ("zero-init", "const"):
        replace_modules(model, lambda m: isinstance(m, nn.GELU),
                             lambda m: DeltaRational(groups, *((6, 4) if method == "zero-init" else (1, 0))))
    elif method != "head":                                # Table 3: other learnable activations
        make = {"prelu": lambda m: nn.PReLU(), "elu": lambda m: LearnableELU(), "arelu": lambda m: AReLU()}[method]
        replace_modules(model, lambda m: isinstance(m, nn.GELU), make)
    model.head.requires_grad_(True)
    return model


def replace_modules(model, target, make):
    """Replace each submodule for which ``target(module)`` is true by ``make(module)``, all built before any goes in."""
    found = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if target(child)]
    for (parent, name, _), new in list(zip(found, [make(child) for _, _, child in found])):
        setattr(parent, name, new)


def example_input(model):
    """One blank image of the size ``model`` (our ViT) takes: add_nora's example."""
    (h, w), p = model.patch_embed.grid_size, model.patch_embed.proj.kernel_size[0]
    return torch.zeros(1, 3, h * p, w * p, device=model.cls_token.device)


def build_model(args, method=None):
    """(model, base parameter count): the pretrained ViT set up for ``method`` (default args.method; 'plain': as is)."""
    torch.manual_seed(args.seed)
    model = nora.create_vit(args.model, img_size=args.img_size, num_classes=NUM_CLASSES[args.dataset], depth=args.depth)
    if args.weights != "none":
        try:
            nora.load_pretrained(model, args.weights or args.model)
        except (RuntimeError, OSError, ValueError) as e:
            sys.exit(f"error: {e}")
    total = nora.count_parameters(model)[1]
    if method != "plain":
        prepare(model, args.method, groups=args.grow_from or args.groups, rank=args.rank, alpha=args.alpha,
                lora_rank=args.lora_rank, lora_alpha=2 * args.lora_rank,
                **({} if args.basis_scale is None else {"basis_scale": args.basis_scale}))
        for m in (m for m in model.modules() if args.grow_from and isinstance(m, nora.NoRA)):   # paper Sec. 4.2
            grow_groups(m, args.groups)
    return model.to(args.device), total


@torch.no_grad()
def grow_groups(module, groups):
    """Split every group of a NoRA ``module`` into groups / G consecutive copies of itself (paper Sec. 4.2
    duplicates the group-wise coefficients along the channels), the function unchanged. The trainable
    tensors are replaced, so grow before building the optimizer."""
    old, groups = module.numerator.shape[0], nora._positive_int(groups, "grow_groups: groups")
    if groups % old or any(w % groups for w in module.channels or ()):
        raise ValueError(f"grow_groups: new group count {groups} must be a multiple of {old} and divide the "
                         f"{module.channels} channels add_nora saw")
    k = groups // old
    for name in ("numerator", "denominator"):
        setattr(module, name, getattr(module, name).repeat_interleave(k, 0))
    for name in ("A_P", "B_P", "A_Q", "B_Q"):
        p = getattr(module, name)
        if name.startswith("B") or module.form == "per_group":
            setattr(module, name, nn.Parameter(p.repeat_interleave(k, 0), requires_grad=p.requires_grad))


# --- training ----------------------------------------------------------------------------------

def input_pipeline(args):
    """preprocess with this run's image size, normalisation and device: uint8 batch -> model input."""
    mean, std = (torch.tensor(v, device=args.device)[:, None, None] for v in (args.mean, args.std))   # built once
    return functools.partial(preprocess, img_size=args.img_size, mean=mean, std=std, device=args.device)


def evaluate(model, x, y, prep, batch_size, amp=None):
    """Top-1 accuracy (%) on uint8 images ``x`` (``prep``: batch -> input; ``amp``: autocast dtype), one sync."""
    result, device = [None], next(model.parameters()).device
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:   # torchrun: rank 0 alone
        model.eval()
        correct = torch.zeros((), dtype=torch.long, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            for i in range(0, len(x), batch_size):
                correct += (model(prep(x[i:i + batch_size])).argmax(1) == y[i:i + batch_size].to(device)).sum()
        model.train()
        result = [100.0 * correct.item() / len(x)]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(result, src=0)
    return result[0]


def param_groups(model, lr, head_lr=None, nora_lr=None):
    """AdamW parameter groups: the head's trainable parameters at ``head_lr``, NoRA's at ``nora_lr``, all other
    trainable ones (LoRA, ...) at ``lr`` (either left None: ``lr``). A fresh head wants a larger step than a
    low-rank update of a pretrained model, and NoRA's update in the (x/3)^i basis a larger one than LoRA's."""
    groups = {"head": [], "nora": [], "rest": []}
    for name, m in model.named_modules():
        kind = "head" if name == "head" or name.startswith("head.") else "nora" if isinstance(m, nora.NoRA) else "rest"
        groups[kind] += [p for p in m.parameters(recurse=False) if p.requires_grad]
    lrs = {"head": head_lr, "nora": nora_lr, "rest": lr}
    return [dict(params=ps, lr=lr if lrs[k] is None else lrs[k]) for k, ps in groups.items() if ps]


class Diverged(Exception):
    """The loss stopped being finite."""


def train(args, data, eval_name="test"):
    """Fine-tune on data[:2]; after each epoch, report the accuracy on data[2:] (test or validation)."""
    train_x, train_y, test_x, test_y = data
    model, total = build_model(args)
    compile_rational(args)
    trainable = nora.count_parameters(model)[0]
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head") and p.requires_grad)
    # torchrun: DDP averages the gradients over the processes; our ViT has no buffers, so no collective per forward
    forward = model if args.world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[args.device] if args.device.type == "cuda" else None, broadcast_buffers=False)
    steps_per_epoch = max(1, len(train_x) // args.batch_size)
    steps = args.epochs * steps_per_epoch if args.steps is None else args.steps
    lr, head_lr, own_lr = learning_rates(args)
    opt = torch.optim.AdamW(param_groups(model, lr, head_lr, own_lr), weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    # float16 AMP's loss scale starts at 2^10, not torch's 2^16: the fresh head's first steps at its own lr
    # (loss ~7) overflow float16 gradients at 2^16 and skip 3 steps on the real ViT-S
    scaler = getattr(torch.amp, "GradScaler", torch.cuda.amp.GradScaler)(       # (torch.cuda.amp's before torch 2.3)
        init_scale=2.0 ** 10, enabled=args.amp == torch.float16 and args.device.type == "cuda")
    g = torch.Generator().manual_seed(args.seed)
    train_x, train_y = train_x.to(args.device), train_y.to(args.device)   # CIFAR's uint8 fits on any GPU
    prep = input_pipeline(args)
    print(f"{args.method} on {args.dataset}: {len(train_x)} train / {len(test_x)} {eval_name} images at {args.img_size} px, "
          f"{steps} steps, lr {lr:g}, head lr {head_lr:g}{f', NoRA lr {own_lr:.2g}' if 'nora' in args.method else ''}, "
          f"trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    history, step, start, seen = [], 0, time.time(), 0
    last = (start, 0)                                    # (time, images seen) at the last log line
    shard = args.batch_size // args.world                # torchrun: this process's part of each batch
    model.train()
    while step < steps:
        # an epoch's order and flips, drawn on the CPU (the same on any device) and moved once, from
        # pinned memory on a GPU: the copy is then queued like a kernel, with no host-device sync
        order, flips = torch.randperm(len(train_x), generator=g), torch.rand(steps_per_epoch * args.batch_size, generator=g) < 0.5
        if args.device.type == "cuda":
            order, flips = (t.pin_memory().to(args.device, non_blocking=True) for t in (order, flips))
        for i in range(steps_per_epoch):
            if step == steps:
                break
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
                now = time.time()                       # the rate since the last log: no compile time or evaluation
                rate, last = (seen - last[1]) / max(now - last[0], 1e-9), (now, seen)
                left = (steps - step) * args.batch_size / rate
                print(f"  step {step}/{steps}  loss {value:.4f}  {rate:.0f} img/s  "
                      f"{time.strftime('%H:%M:%S', time.gmtime(left))} left", flush=True)
            if step % steps_per_epoch == 0 or step == steps:
                history.append(evaluate(model, test_x, test_y, prep, args.batch_size, args.amp))
                print(f"  epoch {len(history)}: {eval_name} accuracy {history[-1]:.2f}%", flush=True)
                last = (time.time(), seen)                 # the next rate leaves the evaluation out
    return model, dict(trainable=trainable, backbone=trainable - head, total=total, percent=100 * trainable / total,
                       lr=lr, head_lr_used=head_lr, nora_lr_used=own_lr if "nora" in args.method else None,
                       accuracy=history[-1], history=history, seconds=round(time.time() - start, 1),
                       **activation_drift(model))


def activation_drift(model, x_range=8.0):
    """How far training moved NoRA's activations: the largest |phi(x) - GELU(x)| on [-8, 8] over all
    layers and groups, and in how many layers a group's b_n (which sets the tails) went below zero."""
    x = torch.linspace(-x_range, x_range, 161)
    noras = [m for m in model.modules() if isinstance(m, nora.NoRA)]
    if not noras:
        return dict(drift=None, layers_b_n_below_zero=None)
    drift = max((group_curves(m, x) - F.gelu(x)[:, None]).abs().max().item() for m in noras)
    with torch.no_grad():
        below = sum((m.coefficients()[1][:, -1] < 0).any().item() for m in noras)
    return dict(drift=drift, layers_b_n_below_zero=below)


def record(args, result):
    print(f"RESULT method={args.method} dataset={args.dataset} trainable={result['trainable']:,} "
          f"({result['percent']:.3f}%) accuracy={result['accuracy']:.2f}% time={result['seconds']:.0f}s"
          + ("" if result.get("drift") is None else f" max|phi-GELU| on [-8,8]={result['drift']:.3g}, "
             f"b_n<0 in {result['layers_b_n_below_zero']} layers"))
    return append_record(args, {**run_settings(args), **result})


def read_records(path):
    """The records in the --out file ``path`` (a JSON list of records), or none if there is no such file."""
    try:
        records = json.loads(Path(path).read_text()) if path and Path(path).exists() else []
    except (ValueError, UnicodeDecodeError) as e:
        records = e
    if not (isinstance(records, list) and all(isinstance(r, dict) for r in records)):
        sys.exit(f"error: {path} is not a JSON list of results ({records}); pass another --out, or repair or move it")
    return records


def append_record(args, rec):
    """Add ``rec`` to --out, if given, under an exclusive lock on --out.lock (released when it closes; none where
    fcntl is missing, as on Windows) and through a temporary file, so that neither a second run nor a crash loses
    a record; under torchrun only the first process writes. Returns ``rec``."""
    if args.out and args.process == 0:
        with open(f"{os.path.realpath(args.out)}.lock", "a") as f:   # (one lock per file, whatever link names it)
            if fcntl:
                fcntl.flock(f, fcntl.LOCK_EX)
            nora.write_atomic(args.out, json.dumps(read_records(args.out) + [rec], indent=1))
    return rec


SAVED_SETTINGS = ("method", "groups", "rank", "alpha", "basis_scale", "grow_from", "model", "img_size", "depth",
                  "dataset", "mean", "std", "lora_rank", "seed")   # what --eval-adapter rebuilds the run with
SAVEABLE = ("head", "lora", "nora", "nora++", "nora-monomial", "nora-group", "nora-num", "nora-den")


def evaluate_adapter(args, data):
    """Load a --save file's adapters and head into the pretrained model set up as the saved run was (args hold
    its settings)."""
    model, _ = build_model(args)
    try:
        nora.load_adapter(model, args.eval_adapter)
    except ValueError as e:
        sys.exit(f"error: {args.eval_adapter}: {e}")
    compile_rational(args)
    acc = evaluate(model, data[2], data[3], input_pipeline(args), args.batch_size, args.amp)
    print(f"RESULT eval-adapter {args.eval_adapter}: method={args.method} accuracy={acc:.2f}%")
    if args.plot_activations and args.process == 0:
        plot_activations(model, args.plot_activations)
    return append_record(args, {**run_settings(args), "eval_adapter": args.eval_adapter, "accuracy": acc})


def run_settings(args):
    """The run's flags as JSON takes them, for records and --save files."""
    return json.loads(json.dumps({k: v for k, v in vars(args).items() if k not in ("process", "world")}, default=str))


def run(args, data):
    try:
        model, result = train(args, data)
    except Diverged as e:
        sys.exit(f"error: {e}")
    if args.save and args.process == 0:                  # a .safetensors file that describes itself
        state = nora.save_adapter(model, args.save, metadata={"train_vit": json.dumps(run_settings(args))})
        print(f"saved adapter and head ({sum(v.numel() for v in state.values()):,} numbers) to {args.save}")
    if args.plot_activations and args.process == 0:
        plot_activations(model, args.plot_activations)
    return record(args, result)


def group_curves(module, x):
    """(len(x), G): each group's function of a NoRA or GroupRational ``module`` at the points ``x``."""
    num, den = module.coefficients() if isinstance(module, nora.NoRA) else (module.numerator, module.denominator)
    with torch.no_grad():                                 # column g of (N, G) inputs goes through group g's rational
        return nora.rational(x[:, None].expand(-1, len(num)).contiguous(), num.detach().cpu(), den.detach().cpu())


def plot_activations(model, path, x_range=8.0):
    """Two panels per rational activation in ``model``: each group's function (colours) against GELU
    (grey, dashed), and its difference from GELU, on [-x_range, x_range]; nothing where there are none."""
    x, panels = torch.linspace(-x_range, x_range, 161), []
    for name, m in model.named_modules():
        if isinstance(m, (nora.NoRA, GroupRational)):
            y = group_curves(m, x)
            colours = [fit_gelu.hue(300 * g / y.shape[1]) for g in range(y.shape[1])]
            layer = name.replace(".mlp.act", "")
            panels.append((layer, [(x, F.gelu(x), "#888", True)] + [(x, y[:, g], c, False) for g, c in enumerate(colours)]))
            panels.append((f"{layer}: minus GELU", [(x, y[:, g] - F.gelu(x), c, False) for g, c in enumerate(colours)]))
    if panels:
        fit_gelu.write_svg(path, panels)
    print(f"wrote {path}: {len(panels) // 2} layers, every group's activation against GELU (dashed)" if panels else
          f"--plot-activations: {type(model).__name__} has no rational activations to draw; nothing written")
    return len(panels) // 2


# --- the paper's tables ----------------------------------------------------------------------

def table(args, data):
    name, col = args.table, 0 if args.dataset == "cifar10" else 1
    rows = []
    for entry in TABLES[name]:
        change = dict(method="nora", rank=3, grow_from=8, groups=entry) if name == "groups" else dict(method=entry)
        res = run(argparse.Namespace(**{**vars(args), **change}), data)
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


def write_table(args, name, text):
    """Print the table and write it to table-<name>-<dataset>-<scale>.md, in one step that fails where a file exists
    (even one another run just made); a file there with other contents is kept and the table takes the next name."""
    print(text)
    text, k = text.lstrip() + "\n", 1
    while args.process == 0:
        md = Path(f"table-{name}-{args.dataset}-{args.scale}{f'-{k}' if k > 1 else ''}.md")
        try:
            if md.exists() and not md.is_file():         # (a folder of that name: the next name)
                raise FileExistsError(md)
            nora.write_atomic(md, text, replace=False)
        except FileExistsError:
            if not md.is_file() or md.read_text() != text:
                k += 1
                continue
        print(f"\nwrote {md}" + (f"; every run's record is in {args.out}" if args.out else ""))
        return md


# --- the baselines of the paper's tables -----------------------------------------------------
# What Tables 1, 3, 4 and 5 compare NoRA with, on the same frozen ViT, each as small as it can be: DoRA and QLoRA
# on LoRA's rows, VPT prompts, bottleneck adapters, other learnable activations, the coefficient-tuning variants.

class DoRALinear(nora.LoRALinear):
    """DoRA: each adapted row is magnitude * direction, W' = m (W0 + B A) / ||W0 + B A||, m trainable from ||W0||
    (W' = W0 at step 0); the norm is a constant in backward (DoRA paper, Sec. 4.3). (out, in) weights only."""

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
    """A frozen linear in 4 bits (QLoRA's NF4): each block of 64 weights keeps its absmax and 4-bit indices into
    NF4_LEVELS, two per byte, dequantised at every forward (absmax stays float32: no "double quantisation")."""

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


class GroupRational(nn.Module):
    """Group-KAN's group-wise rational with every coefficient trainable, G (m+1+n) per layer: Table 4's
    "rational tuning". ``init``: as for nora.NoRA."""

    def __init__(self, groups=8, init="gelu"):
        super().__init__()
        num, den = nora._init_coefficients(init, groups)
        self.numerator, self.denominator = nn.Parameter(num), nn.Parameter(den)

    def forward(self, x):
        return nora.rational(x, self.numerator, self.denominator)


class DeltaRational(nn.Module):
    """Frozen base coefficients plus a trained, zero-initialised update of the first ``num_terms`` numerator and
    ``den_terms`` denominator coefficients (Table 4): all of them is "zero-init tuning" (NoRA without the low-rank
    factorisation), (1, 0) "const tuning" (a0; the paper also tunes b0, which our Q does not have)."""

    def __init__(self, groups=8, num_terms=6, den_terms=4, init="gelu"):
        super().__init__()
        num, den = nora._init_coefficients(init, groups)
        self.register_buffer("numerator", num)
        self.register_buffer("denominator", den)
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

def make_parser():
    """Every flag with its default and help, grouped by purpose (dev/sweeps.py adds its own to these)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to run")
    g.add_argument("--method", choices=METHODS, default="nora", help="NoRA, a baseline or an ablation variant (default: %(default)s)")
    g.add_argument("--table", choices=TABLES, help="run every row of a paper table instead: methods (Table 1), groups "
                   "(Fig. 2), ablation (Tables 4, 5), activations (Table 3); Table 6 (efficiency) is dev/bench.py's")
    g.add_argument("--dataset", choices=CIFAR, default="cifar10", help="default: %(default)s")
    g.add_argument("--data-root", default="data", help="folder holding (or to receive) CIFAR's python-format folder (default: %(default)s)")
    g.add_argument("--no-download", action="store_true", help="never download CIFAR; fail if it is not in --data-root")
    g = p.add_argument_group("NoRA and LoRA")
    g.add_argument("--groups", type=int, default=8, help="NoRA's channel groups G (default: %(default)s)")
    g.add_argument("--rank", type=int, default=2, help="rank r of NoRA's update (default: %(default)s)")
    g.add_argument("--alpha", type=float, help="NoRA's update is scaled by alpha / r (default: 2 r, the released code's)")
    g.add_argument("--basis-scale", type=float,
                   help=f"NoRA learns its update in the basis (x/s)^i (default: s = {BASIS_SCALE:g}; 1 is the paper's monomials)")
    g.add_argument("--grow-from", type=int, default=0,
                   help="build NoRA with this many groups, then replicate them to --groups (paper Sec. 4.2; default: off)")
    g.add_argument("--lora-rank", type=int, default=8,
                   help="LoRA's rank in lora, dora, qlora and nora++, with alpha = 2 x rank (default: %(default)s, paper C.1)")
    g = p.add_argument_group("the model")
    g.add_argument("--model", choices=nora.PRETRAINED, default=nora.DEFAULT_WEIGHTS, help="pretrained ViT: a "
                   "record of nora.PRETRAINED (size, patch, LayerScale, normalisation; default: %(default)s)")
    g.add_argument("--weights", help="its checkpoint: a file or URL (default: the --model's on the hub); 'none' for random")
    g.add_argument("--depth", type=int, help="use only the first blocks (default: all; for quick experiments)")
    g.add_argument("--img-size", type=int, help="input size in px (default: 224 at --scale paper, 64 at small)")
    g = p.add_argument_group("training")
    g.add_argument("--scale", choices=SCALES, default="paper", help="presets for --img-size, --epochs, "
                   "--batch-size and the subsets: paper (appendix C, the default) or small (a table on a 2-core CPU)")
    g.add_argument("--epochs", type=int, help="default: 50 at --scale paper, 5 at small")
    g.add_argument("--steps", type=int, help="stop after this many steps (default: --epochs' worth)")
    g.add_argument("--batch-size", type=int, help="the global batch (default: 256 at --scale paper, 64 at small)")
    g.add_argument("--train-subset", type=int, help="class-balanced subset of the training set (default: all at "
                                                       "--scale paper, 5000 at small)")
    g.add_argument("--test-subset", type=int, help="class-balanced subset of the test set (default: all at --scale "
                                                      "paper, 1000 at small)")
    g.add_argument("--lr", type=float, help="lr of the adapted weights (default: 1e-3; VPT 5e-3, DoRA 5e-4, paper "
                                           "C.1); given, every part trains at it unless --head-lr / --nora-lr say otherwise")
    g.add_argument("--head-lr", type=float, help=f"lr of the task head (default: {HEAD_LR:g}; --lr where --lr is given)")
    g.add_argument("--nora-lr", type=float, help=f"lr of NoRA's parameters, in nora and nora++ (default: {NORA_LR:g}; "
                                                 f"--lr where --lr is given or with the paper's monomial basis)")
    g.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's, with a cosine schedule (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    g = p.add_argument_group("the machine")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda where there is one, else cpu")
    g.add_argument("--no-amp", action="store_true", help="no mixed precision (default: on with CUDA)")
    g.add_argument("--amp-dtype", choices=["float16", "bfloat16"], default="float16",
                   help="autocast dtype with CUDA: float16 with a gradient scaler (the default, the paper's AMP) "
                        "or bfloat16 (no scaler; Ampere and newer GPUs)")
    g.add_argument("--no-compile", action="store_true",
                   help="run the rational's eager kernels (default: torch.compile'd ones, seconds to compile)")
    g.add_argument("--threads", type=int, default=0, help="CPU threads (default: 0, torch's choice)")
    g.add_argument("--log-every", type=int, default=20, help="steps between loss lines (default: %(default)s)")
    g = p.add_argument_group("outputs")
    g.add_argument("--out", help="append a JSON record of every run to this file (default: none; results.json with --table)")
    g.add_argument("--save", help="write the adapters, head and the run's settings to this file")
    g.add_argument("--eval-adapter", help="load a --save file onto the pretrained model and evaluate it")
    g.add_argument("--plot-activations", help="after training, draw every layer's learned activations into this .svg")
    return p


def check_output_paths(p, paths, inputs=()):
    """Fail before any data is read, not after training, if a result could not be written, two results
    would land in one file, or a result would replace an input; ``paths``, ``inputs``: {flag: path}."""
    given, resolved, inputs = {flag: Path(path) for flag, path in paths.items() if path is not None}, {}, dict(inputs)
    for flag, path in given.items():
        try:
            nora.check_writable(path)                     # what nora.write_atomic would refuse, refused now
        except OSError as e:
            p.error(f"{flag} {path}: {e.strerror or e}")
        if path.resolve() in resolved:
            p.error(f"{flag} and {resolved[path.resolve()]} name the same file {path}; give each its own")
        resolved[path.resolve()] = flag
    for flag, path in inputs.items():                     # nor over what the run reads
        if path and (Path(path).resolve() in resolved or Path(path).is_dir() and any(
                Path(path).resolve() in out.parents for out in resolved)):
            p.error(f"{flag} {path} would be overwritten by an output of this run; give the outputs other paths")
    try:
        read_records(paths.get("--out"))
    except SystemExit:
        p.error(f"--out {paths['--out']} exists but is not a JSON list of results; pass another file or delete it")


def parse_args(argv=None, parser=None, outputs=()):
    """Parse and check the flags (``parser``: make_parser()'s, with a caller's flags added; ``outputs``:
    more flags that name files to write); fills the --scale presets and the run's device and normalisation."""
    p = parser or make_parser()
    args = p.parse_args(argv)
    for k, v in SCALES[args.scale].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    at_least = {**dict.fromkeys(("epochs", "batch_size", "log_every", "groups", "rank", "lora_rank", "img_size"), 1),
                **dict.fromkeys(("train_subset", "test_subset", "threads", "grow_from", "seed"), 0)}
    for k, low in at_least.items():
        if getattr(args, k) < low:
            p.error(f"--{k.replace('_', '-')} must be at least {low}, got {getattr(args, k)}")
    for k in ("steps", "depth", "alpha", "lr", "head_lr", "nora_lr", "basis_scale"):
        v = getattr(args, k)
        if v is not None and not (v > 0 and math.isfinite(v)):
            p.error(f"--{k} must be positive, got {v}")
    record = nora.PRETRAINED[args.model]
    (dim, depth, _), patch = nora.VIT_SIZES[record["size"]], record["patch_size"]
    width = 4 * dim
    for k, most in dict(img_size=1024, depth=depth, rank=64, lora_rank=dim, seed=2 ** 31 - 1).items():
        if (getattr(args, k) or 0) > most:
            p.error(f"--{k.replace('_', '-')} {getattr(args, k)} is more than this model takes (at most {most})")
    if (args.save or args.eval_adapter) and args.method not in SAVEABLE:
        p.error(f"--save and --eval-adapter keep NoRA and LoRA adapters (--method {', '.join(SAVEABLE)}); "
                f"--method {args.method}'s modules are not among them")
    if width % args.groups or (args.grow_from and (args.groups % args.grow_from or width % args.grow_from)):
        p.error(f"--groups {args.groups}{f' and --grow-from {args.grow_from}' if args.grow_from else ''} must divide "
                f"the ViT's MLP width {width} (and --grow-from --groups), e.g. --groups 8")
    if args.img_size < patch:
        p.error(f"--img-size {args.img_size} is smaller than the model's {patch} px patches")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this machine has no CUDA device; use --device cpu")
    if args.table and (args.save or args.eval_adapter or args.plot_activations or args.method != p.get_default("method")):
        p.error("--table runs every row of a table: it cannot be combined with --save, --eval-adapter, "
                "--plot-activations or --method")
    if args.eval_adapter and args.save:
        p.error("--eval-adapter evaluates a saved adapter and trains nothing, so there is nothing to --save")
    if args.eval_adapter and not Path(args.eval_adapter).is_file():
        p.error(f"--eval-adapter: no file at {args.eval_adapter}")
    check_output_paths(p, {"--save": args.save, "--out": args.out, "--plot-activations": args.plot_activations,
                           **{flag: getattr(args, flag[2:].replace("-", "_")) for flag in outputs}},
                       {"--eval-adapter": args.eval_adapter, "--weights": args.weights,
                        "--data-root": Path(args.data_root) / CIFAR[args.dataset][0]})
    if args.weights not in (None, "none") and Path(args.weights).is_file():   # a --save file names it from anywhere
        args.weights = str(Path(args.weights).resolve())
    args.device = torch.device(args.device)
    args.amp = getattr(torch, args.amp_dtype) if args.device.type == "cuda" and not args.no_amp else None
    args.mean, args.std = record["mean"], record["std"]
    args.process, args.world = 0, 1                     # this process's rank and the count (session)
    if args.table and args.out is None:
        args.out = "results.json"
    return args


def saved_run_flags(path, weights):
    """The flags of the run that wrote the --save file ``path``, from its metadata, for the parser to check (an
    odd method, size or depth is refused, not built); its checkpoint unless ``weights`` (--weights), never a URL."""
    try:
        settings = json.loads(nora.read_safetensors(path, metadata=True)[1].get("train_vit", "null"))
    except (ValueError, RecursionError) as e:
        sys.exit(f"error: {path} could not be read as a saved adapter: {type(e).__name__}: {e}")
    if not (isinstance(settings, dict) and "method" in settings):
        sys.exit(f"error: {path} is not a train_vit.py --save file (it has no run settings: load it in Python "
                 f"with nora.load_adapter(model, path) into a model holding its adapters)")
    if weights is None and str(settings.get("weights")).startswith(("http://", "https://")):
        sys.exit(f"error: {path} names a URL as the checkpoint it was trained on ({settings['weights']}); pass "
                 f"--weights (that URL, to download it, or a local file)")
    names = [k for k in SAVED_SETTINGS if k not in ("mean", "std")] + ["weights"] * (weights is None)
    return [f for k in names if settings.get(k) is not None for f in (f"--{k.replace('_', '-')}", str(settings[k]))]


@contextlib.contextmanager
def session(args):
    """The run's processes, seed, threads, determinism and TF32; a Python caller's torch settings (and eager or
    compiled rational) are restored afterwards. Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set): the process
    group (NCCL on GPUs, gloo on CPUs) and this process's GPU; only rank 0 evaluates (for all), prints and writes."""
    args.process, args.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.world > 1:
        if args.batch_size % args.world:
            sys.exit(f"error: --batch-size {args.batch_size} must be a multiple of the {args.world} processes")
        if args.device.type == "cuda":
            args.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(args.device)
        torch.distributed.init_process_group("nccl" if args.device.type == "cuda" else "gloo")
    deterministic = torch.are_deterministic_algorithms_enabled()
    threads, precision = torch.get_num_threads(), torch.get_float32_matmul_precision()
    kernels = dict(nora._kernels)                       # eager or compiled rational, as the caller had it
    try:
        with contextlib.redirect_stdout(None) if args.process else contextlib.nullcontext():
            torch.manual_seed(args.seed)
            if args.threads:
                torch.set_num_threads(args.threads)
            if args.device.type == "cpu":
                torch.use_deterministic_algorithms(True)
            else:                                       # TF32 matmuls for the float32 parts (--no-amp too)
                torch.set_float32_matmul_precision("high")
            yield
    finally:
        if args.world > 1:
            torch.distributed.destroy_process_group()
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
        nora._kernels.update(kernels)


def load_data(args):
    """(train_x, train_y, test_x, test_y): the run's dataset and class-balanced subsets."""
    train_x, train_y, test_x, test_y = load_cifar(args.dataset, args.data_root, not args.no_download)
    tr = balanced_subset(train_y, args.train_subset, args.seed)
    te = balanced_subset(test_y, args.test_subset, args.seed + 1)
    if args.batch_size > len(tr) and not args.eval_adapter:
        sys.exit(f"error: --batch-size {args.batch_size} is more than the {len(tr)} training images; "
                 f"lower it or raise --train-subset")
    return train_x[tr], train_y[tr], test_x[te], test_y[te]


def compile_rational(args):
    """The compiled rational (unless --no-compile), once data and weights are in: a missing file is said first."""
    if not args.no_compile and nora._kernels["chunk"] is not None:
        compiled = use_compiled_rational(device=args.device)
        print(f"rational: {'compiled' if compiled else 'eager (torch.compile failed, see the warning)'}")


def use_compiled_rational(device=None):
    """Run nora's rational through torch.compile'd kernels, each pass fused into one loop over memory (seconds to
    compile, so opt-in). They warm up on ``device`` (default: CUDA if there is one), where they run; tensors on
    another device (a plot's, on the CPU) take the eager kernels. Rows dynamic, all else static: one graph per
    channel count serves every batch size (all-static recompiles per batch size, fully dynamic ran 40x slower).
    Returns whether compiled; a failure warns and stays eager. nora._kernels.update(nora._EAGER) undoes it."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def compiled(kernel):
        fast = torch.compile(kernel, dynamic=False)

        def run(x, numerator, denominator, *grad_and_needs):   # (backward: the gradient and `needs` too)
            if x.device.type != device.type:
                return kernel(x, numerator, denominator, *grad_and_needs)
            tensors = [t.detach() for t in (x, numerator, denominator, *grad_and_needs[:1])]
            for t in tensors[:1] + tensors[3:]:
                torch._dynamo.maybe_mark_dynamic(t, 0)
            return fast(*tensors)       # backward: all three gradients (each `needs` would be a graph)
        return run
    forward, backward = compiled(nora._rational_forward), compiled(nora._rational_backward)
    try:
        x = torch.linspace(-4, 4, 96, device=device).view(12, 8)   # not randn: the global RNG stays put
        num, den = torch.ones(2, 6, device=device), torch.ones(2, 4, device=device)
        with torch.no_grad():
            for rows in (12, 5):                          # two row counts: the second must reuse the graph
                forward(x[:rows], num, den), backward(x[:rows], num, den, x[:rows], (True, True, True))
    except Exception as e:                                # any failure to compile: stay eager
        warnings.warn(f"use_compiled_rational: torch.compile failed on {device} ({type(e).__name__}: {e}); "
                      f"using the eager path")
        return False
    nora._kernels.update(forward=forward, backward=backward, chunk=None)
    return True


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.eval_adapter:                               # the saved run's settings pick the data and seed too
        saved = saved_run_flags(args.eval_adapter, args.weights)
        theirs = parse_args(argv + saved)
        unset = make_parser()                             # what the command line gave, however it was spelt
        unset.set_defaults(**dict.fromkeys(vars(unset.parse_args([])), None))
        given = {k for k, v in vars(unset.parse_args(argv)).items() if v is not None}
        clash = [f"--{k.replace('_', '-')} {getattr(args, k)}" for k in (f[2:].replace("-", "_") for f in saved[::2])
                 if k in given and getattr(args, k) != getattr(theirs, k)]
        if clash:
            sys.exit(f"error: --eval-adapter rebuilds the saved run, whose settings differ from {', '.join(clash)}; "
                     f"drop those flags")
        args = theirs
    with session(args):
        data = load_data(args)
        if args.eval_adapter:
            return evaluate_adapter(args, data)
        return table(args, data) if args.table else run(args, data)


if __name__ == "__main__":
    main()
