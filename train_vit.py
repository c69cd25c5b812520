"""Fine-tune a pretrained ViT-Tiny on CIFAR-10/100 with NoRA (or a baseline) and reproduce the paper's tables.

    python train_vit.py --groups 8 --rank 2                       # NoRA, paper protocol (appendix C)
    python train_vit.py --method lora --dataset cifar100 --scale small
    python train_vit.py --table methods --scale small             # Table 1 at laptop scale
    python train_vit.py --method nora --scale small --save a.pt   # then: --eval-adapter a.pt

Everything model-side lives in nora.py; this script parses arguments, loads data, trains and prints.
"""
import argparse
import json
import math
import pickle
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import nora

CIFAR = {  # folder, train files, test file, label key, archive URL, its md5 (as torchvision has them)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels",
                "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
METHOD_LR = {"vpt": 5e-3, "dora": 5e-4}          # paper C.1; every other method uses --lr (1e-3)

# --scale presets. 'paper' is appendix C (Table 7); 'small' finishes a table on a 2-core CPU.
SCALES = {
    "paper": dict(img_size=224, epochs=50, batch_size=256, train_subset=0, test_subset=0),
    "small": dict(img_size=64, epochs=5, batch_size=64, train_subset=5000, test_subset=1000),
}

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
            if not (path / f).is_file():
                sys.exit(f"error: {path / f} is missing; the {name} folder is incomplete. Delete {path} "
                         f"and run again to re-download, or extract the archive there again.")
            with open(path / f, "rb") as fh:
                batch = pickle.load(fh, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch[key], dtype=np.int64))
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


def preprocess(x, img_size, mean, std, flip_generator=None):
    """uint8 (B, 3, 32, 32) -> normalised float (B, 3, S, S), with random horizontal flips when training."""
    x = x.float() / 255
    if flip_generator is not None:
        flip = torch.rand(len(x), generator=flip_generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if img_size != x.shape[-1]:
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


# --- model -------------------------------------------------------------------------------------

def build_model(args):
    """The pretrained ViT, set up for args.method. Returns (model, total parameters of the base model)."""
    torch.manual_seed(args.seed)
    model = nora.VisionTransformer(args.size, args.patch_size, args.img_size, NUM_CLASSES[args.dataset],
                                   layer_scale=args.layer_scale, depth=args.depth)
    if args.weights != "none":
        try:
            nora.load_pretrained(model, args.weights)
        except (RuntimeError, OSError, ValueError) as e:
            sys.exit(f"error: {e}")
    total = nora.count_parameters(model)[1]
    nora.prepare(model, args.method, groups=args.grow_from or args.groups, rank=args.rank, alpha=args.alpha)
    if args.grow_from:                                  # paper Sec. 4.2: replicate groups
        for m in model.modules():
            if isinstance(m, nora.NoRA):
                m.grow(args.groups)
    return model.to(args.device), total


# --- training ----------------------------------------------------------------------------------

def evaluate(model, x, y, args):
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(args.device.type, enabled=args.amp):
        for i in range(0, len(x), args.batch_size):
            xb = preprocess(x[i:i + args.batch_size], args.img_size, args.mean, args.std).to(args.device)
            correct += (model(xb).argmax(1).cpu() == y[i:i + args.batch_size]).sum().item()
    model.train()
    return 100.0 * correct / len(x)


def train(args, data):
    train_x, train_y, test_x, test_y = data
    model, total = build_model(args)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    lr = args.lr if args.lr is not None else METHOD_LR.get(args.method, 1e-3)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=args.weight_decay)
    steps_per_epoch = max(1, len(train_x) // args.batch_size)
    steps = args.epochs * steps_per_epoch if args.steps is None else args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    scaler = torch.amp.GradScaler(enabled=args.amp and args.device.type == "cuda")
    g = torch.Generator().manual_seed(args.seed)
    print(f"{args.method} on {args.dataset}: {len(train_x)} train / {len(test_x)} test images at {args.img_size} px, "
          f"{steps} steps, lr {lr:g}, trainable {trainable:,} of {total:,} ({100 * trainable / total:.2f}%)")
    history, step, start, seen = [], 0, time.time(), 0
    model.train()
    while step < steps:
        order = torch.randperm(len(train_x), generator=g)
        for i in range(steps_per_epoch):
            if step == steps:
                break
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            xb = preprocess(train_x[idx], args.img_size, args.mean, args.std, g).to(args.device)
            with torch.autocast(args.device.type, enabled=args.amp):
                loss = F.cross_entropy(model(xb), train_y[idx].to(args.device))
            if not torch.isfinite(loss):
                sys.exit(f"error: loss is {loss.item()} at step {step}; lower --lr (now {lr:g}) or the NoRA --alpha")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            step, seen = step + 1, seen + len(idx)
            if step % args.log_every == 0 or step == steps:
                rate = seen / (time.time() - start)
                left = (steps - step) * args.batch_size / rate
                print(f"  step {step}/{steps}  loss {loss.item():.4f}  {rate:.0f} img/s  "
                      f"{time.strftime('%H:%M:%S', time.gmtime(left))} left", flush=True)
            if step % steps_per_epoch == 0 or step == steps:
                history.append(evaluate(model, test_x, test_y, args))
                print(f"  epoch {len(history)}: test accuracy {history[-1]:.2f}%", flush=True)
    return model, dict(trainable=trainable, total=total, percent=100 * trainable / total, lr=lr,
                       accuracy=history[-1], history=history, seconds=round(time.time() - start, 1))


def record(args, result):
    rec = {**{k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}, **result}
    print(f"RESULT method={args.method} dataset={args.dataset} trainable={result['trainable']:,} "
          f"({result['percent']:.3f}%) accuracy={result['accuracy']:.2f}% time={result['seconds']:.0f}s")
    if args.out:
        path = Path(args.out)
        records = json.loads(path.read_text()) if path.exists() else []
        path.write_text(json.dumps(records + [rec], indent=1))
    return rec


SAVED_SETTINGS = ("method", "groups", "rank", "alpha", "grow_from", "size", "patch_size", "img_size",
                  "layer_scale", "depth", "dataset", "mean", "std")


def evaluate_adapter(args, data, state):
    """Load a --save file's adapters and head onto the pretrained model (args already hold its settings)."""
    model, _ = build_model(args)
    nora.load_adapter(model, state)
    acc = evaluate(model.to(args.device), data[2], data[3], args)
    print(f"RESULT eval-adapter {args.eval_adapter}: method={args.method} accuracy={acc:.2f}%")
    return dict(accuracy=acc)


def run(args, data):
    model, result = train(args, data)
    if args.save:
        state = nora.adapter_state_dict(model)
        torch.save({"args": {k: v for k, v in vars(args).items() if k != "device"}, "state": state}, args.save)
        print(f"saved adapter and head ({sum(v.numel() for v in state.values()):,} numbers) to {args.save}")
    return record(args, result)


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
    print(text)
    md = Path(f"table-{name}-{args.dataset}-{args.scale}.md")
    md.write_text(text.lstrip() + "\n")
    print(f"\nwrote {md}" + (f" and appended to {args.out}" if args.out else ""))


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


def efficiency(args):
    dev, reps = args.device, args.repeats
    lines = [f"Efficiency on {dev.type} ({torch.get_num_threads()} threads), median of {reps} interleaved repeats "
             f"after warm-up, torch {torch.__version__}.\n"]
    # 1. the activation alone: a ViT-Tiny MLP's hidden activations for 16 images, G = 8
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
        if compiled and not nora.compile_rational():
            break
        names = [k for k in ops if (k == "ours, compiled") == compiled]
        print(f"timing the activation alone: {', '.join(names)}", flush=True)
        fwd = interleaved_medians({k: (lambda f=ops[k]: op_step(f, False)) for k in names}, reps, dev)
        both = interleaved_medians({k: (lambda f=ops[k]: op_step(f, True)) for k in names}, reps, dev)
        for k in names:
            x, n, d = (t.clone().requires_grad_() for t in (x0, num, den))
            rows[k] = (fwd[k], both[k], saved_bytes(lambda: ops[k](x, n, d))[1])
        nora.compile_rational(False)
    g = rows["GELU"]
    lines.append("| activation on (16, 197, 768), G = 8 | forward ms | x GELU | forward + backward ms | x GELU "
                 "| saved for backward (MB) |\n|---|---|---|---|---|---|")
    lines += [f"| {k} | {f * 1e3:.2f} | {f / g[0]:.2f} | {b * 1e3:.2f} | {b / g[1]:.2f} | {m / 2**20:.1f} |"
              for k, (f, b, m) in rows.items()]

    # 2. the whole model: ViT-Tiny, frozen backbone, one training step and inference
    B = args.bench_batch
    x = torch.randn(B, 3, 224, 224, device=dev)
    y = torch.randint(0, 10, (B,), device=dev)

    def model_for(method):
        torch.manual_seed(0)
        m = nora.prepare(nora.VisionTransformer("tiny", num_classes=10), method, groups=8, rank=2).to(dev)
        return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    def train_step(model, opt):
        with torch.autocast(dev.type, enabled=args.amp):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer(model):
        model.eval()
        with torch.no_grad(), torch.autocast(dev.type, enabled=args.amp):
            model(x)
        model.train()

    from torch.utils.flop_counter import FlopCounterMode
    results = {}
    for compiled in (False, True):
        if compiled and not nora.compile_rational():
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
        nora.compile_rational(False)
    lora, gelu = results["LoRA"], results["GELU model"]
    mem = "peak memory (MB)" if dev.type == "cuda" else "saved for backward (MB)"
    lines.append(f"\n| ViT-Tiny, batch {B}, 224 px | trainable (excl. head) | matmul GFLOPs / image | forward ms / image "
                 f"| x GELU model | train step ms | x LoRA | {mem} | x LoRA |\n|---|---|---|---|---|---|---|---|---|")
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
    text = "\n".join(lines)
    print(text)
    md = Path(f"table-efficiency-{dev.type}.md")
    md.write_text(text + "\n")
    print(f"\nwrote {md}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10", choices=CIFAR)
    p.add_argument("--data-root", default="data", help="folder holding (or to receive) the CIFAR python-format folder")
    p.add_argument("--no-download", action="store_true", help="never download CIFAR; fail if it is not in --data-root")
    p.add_argument("--method", default="nora", choices=nora.METHODS)
    p.add_argument("--table", choices=[*TABLES, "efficiency"], help="run every row of a paper table")
    p.add_argument("--scale", default="paper", choices=SCALES, help="preset for the options below (default: paper)")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--rank", type=int, default=2)
    p.add_argument("--alpha", type=float, default=None, help="NoRA alpha (default 2 * rank)")
    p.add_argument("--grow-from", type=int, default=0, help="build NoRA with this many groups, then replicate to --groups")
    p.add_argument("--img-size", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--steps", type=int, help="stop after this many steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--train-subset", type=int, help="class-balanced subset of the training set (0: all)")
    p.add_argument("--test-subset", type=int, help="class-balanced subset of the test set (0: all)")
    p.add_argument("--lr", type=float, default=None, help="default 1e-3 (VPT 5e-3, DoRA 5e-4, paper C.1)")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--weights", default=nora.DEFAULT_WEIGHTS, help="checkpoint file or URL; 'none' for random weights")
    p.add_argument("--size", default="tiny", choices=nora.VIT_SIZES)
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=None, help="use fewer blocks (quick experiments)")
    p.add_argument("--layer-scale", action="store_true", help="the checkpoint has LayerScale (DeiT-III, DINOv2)")
    p.add_argument("--norm", default="augreg", choices=["augreg", "imagenet"],
                   help="input normalisation of the weights: augreg (0.5, 0.5) or ImageNet mean/std")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", action="store_true", help="disable mixed precision (on by default on CUDA)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5, help="--table efficiency: timed repeats per measurement")
    p.add_argument("--bench-batch", type=int, default=32, help="--table efficiency: batch size of the model rows")
    p.add_argument("--out", help="append a JSON record of every run to this file")
    p.add_argument("--save", help="write the adapters + head (and the settings) to this file")
    p.add_argument("--eval-adapter", help="load a --save file onto the pretrained model and evaluate it")
    args = p.parse_args(argv)
    for k, v in SCALES[args.scale].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.device = torch.device(args.device)
    args.amp = args.device.type == "cuda" and not args.no_amp
    args.mean, args.std = ((nora.AUGREG_MEAN, nora.AUGREG_STD) if args.norm == "augreg"
                           else (nora.IMAGENET_MEAN, nora.IMAGENET_STD))
    if args.table and args.out is None:
        args.out = "results.json"
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    if args.table == "efficiency":
        return efficiency(args)
    if args.eval_adapter:                               # the saved run's settings pick the data too
        saved = torch.load(args.eval_adapter, map_location="cpu", weights_only=False)
        for k in SAVED_SETTINGS:
            setattr(args, k, saved["args"][k])
    train_x, train_y, test_x, test_y = load_cifar(args.dataset, args.data_root, not args.no_download)
    tr = balanced_subset(train_y, args.train_subset, args.seed)
    te = balanced_subset(test_y, args.test_subset, args.seed + 1)
    data = (train_x[tr], train_y[tr], test_x[te], test_y[te])
    if args.eval_adapter:
        return evaluate_adapter(args, data, saved["state"])
    return table(args, data) if args.table else run(args, data)


if __name__ == "__main__":
    main()
