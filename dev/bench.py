"""Benchmarks of the rational activation, beside GELU and LoRA in the same run (paper Table 6, extended).

    python dev/bench.py --threads 2            # on the CPU; on a GPU: --device cuda
    python dev/bench.py --repeats 1 --batch 1  # a quick smoke run

Prints and writes bench-<device>.md: the passes over memory of the eager kernels against GELU's
(counted op by op, the same on any device), the activation alone on a ViT-Tiny MLP's hidden
activations (GELU, the released code's powers-and-bmm rational, Horner under autograd, our eager
and compiled kernels), and ViT-Tiny training steps and inference under LoRA, NoRA and NoRA++ with
the eager and the compiled rational. Every ratio is against a baseline measured in the same run,
interleaved, so drifts in machine speed hit all alike. Figures: dev/RESULTS.md.
"""
import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
import torch.utils._python_dispatch
import torch.utils._pytree

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nora  # noqa: E402
import train_vit as tv  # noqa: E402


def medians(candidates, repeats, device):
    """Median seconds of each callable after one warm-up round, run round-robin (so drifts in the
    machine's speed hit all alike)."""
    times, sync = {k: [] for k in candidates}, torch.cuda.synchronize if device.type == "cuda" else lambda: None
    for r in range(1 + repeats):
        for k, fn in candidates.items():
            sync()
            t = time.perf_counter()
            fn()
            sync()
            if r:                                         # round 0 warms up
                times[k].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def saved_bytes(fn):
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def time_models(device, repeats, batch, amp, methods, merged=()):
    """ViT-Tiny at 224 px with each of ``methods`` ({row: method}) on its frozen backbone, the rows in
    ``merged`` merged first: {row: trainable backbone parameters, matmul FLOPs and forward seconds per
    image, training-step seconds, memory (peak on CUDA; on a CPU, the bytes autograd saves for backward)}."""
    x, y = torch.randn(batch, 3, 224, 224, device=device), torch.randint(0, 10, (batch,), device=device)
    autocast = functools.partial(torch.autocast, device.type, dtype=amp, enabled=amp is not None)
    models = {}
    for row, method in methods.items():
        torch.manual_seed(0)
        m = tv.prepare(nora.VisionTransformer("tiny", num_classes=10), method, groups=8, rank=2).to(device)
        m = nora.merge(m) if row in merged else m
        models[row] = m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)

    def step(m, opt):
        with autocast():
            loss = F.cross_entropy(m(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer(m):
        with torch.no_grad(), autocast():
            m.eval()(x)
        m.train()
    steps = medians({k: functools.partial(step, *mo) for k, mo in models.items()}, repeats, device)
    forward = medians({k: functools.partial(infer, m) for k, (m, _) in models.items()}, repeats, device)
    results = {}
    for k, (m, opt) in models.items():
        if device.type == "cuda":                         # the step's own memory, not the other models'
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        saved = saved_bytes(functools.partial(step, m, opt))
        with FlopCounterMode(display=False) as flops:
            infer(m)
        results[k] = dict(trainable=sum(p.numel() for n, p in m.named_parameters() if p.requires_grad and n[:4] != "head"),
                          flops=flops.get_total_flops() / batch, forward=forward[k] / batch, step=steps[k],
                          memory=torch.cuda.max_memory_allocated() - resident if device.type == "cuda" else saved)
    return results


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
        if compiled and not tv.use_compiled_rational():
            break
        names = [k for k in ops if (k == "ours, compiled") == compiled]
        print(f"timing the activation alone: {', '.join(names)}", flush=True)
        fwd = medians({k: (lambda f=ops[k]: op_step(f, False)) for k in names}, reps, dev)
        both = medians({k: (lambda f=ops[k]: op_step(f, True)) for k in names}, reps, dev)
        for k in names:
            x, n, d = (t.clone().requires_grad_() for t in (x0, num, den))
            rows[k] = (fwd[k], both[k], saved_bytes(lambda: ops[k](x, n, d)))
        nora._kernels.update(nora._EAGER)
    g = rows["GELU"]
    return (["| activation on (16, 197, 768), G = 8 | forward ms | x GELU | forward + backward ms | x GELU "
             "| saved for backward (MB) |\n|---|---|---|---|---|---|"]
            + [f"| {k} | {f * 1e3:.2f} | {f / g[0]:.2f} | {b * 1e3:.2f} | {b / g[1]:.2f} | {m / 2**20:.1f} |"
               for k, (f, b, m) in rows.items()])


def model_rows(dev, reps, batch, amp):
    """Table rows: ViT-Tiny training steps and inference under LoRA, NoRA and NoRA++ (and merged NoRA and
    the GELU model for inference) with the eager and the compiled rational, against LoRA and GELU."""
    results = {}
    for tag in ("eager", "compiled"):
        if tag == "compiled" and not tv.use_compiled_rational(device=dev):
            break
        print(f"timing ViT-Tiny training steps and inference ({tag}), {reps + 1} rounds", flush=True)
        rows = {"LoRA": "lora", f"NoRA, {tag}": "nora", f"NoRA++, {tag}": "nora++", "GELU model": "head",
                f"NoRA merged, {tag}": "nora"}
        results.update(time_models(dev, reps, batch, amp, rows, merged=(f"NoRA merged, {tag}",)))
        nora._kernels.update(nora._EAGER)
    lora, gelu = results["LoRA"], results["GELU model"]
    memory = "peak memory" if dev.type == "cuda" else "saved for backward"
    lines = [f"| ViT-Tiny, batch {batch}, 224 px | trainable (excl. head) | matmul GFLOPs / image | forward ms / image "
             f"| x GELU model | train step ms | x LoRA | {memory} (MB) | x LoRA |", "|---|---|---|---|---|---|---|---|---|"]
    for k, r in results.items():
        trains = k != "GELU model" and "merged" not in k
        cells = [f"{r['trainable'] if trains else 0:,}", f"{r['flops'] / 1e9:.3f}", f"{r['forward'] * 1e3:.2f}",
                 f"{r['forward'] / gelu['forward']:.2f}"] + ([f"{r['step'] * 1e3:.0f}", f"{r['step'] / lora['step']:.2f}",
                 f"{r['memory'] / 2**20:.0f}", f"{r['memory'] / lora['memory']:.3f}"] if trains else ["-"] * 4)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return lines + ["\nFLOPs: torch.utils.flop_counter (matmuls, convolution, attention; elementwise work such as "
                    "the activation is not counted)."]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda where there is one, else cpu")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default: 5)")
    p.add_argument("--batch", type=int, default=32, help="batch size of the ViT-Tiny rows (default: 32)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: 0, torch's choice)")
    p.add_argument("--no-amp", action="store_true", help="no float16 autocast on CUDA (default: on)")
    p.add_argument("--out", default=None, help="write the tables here (default: bench-<device>.md)")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.batch < 1 or args.threads < 0:
        p.error("--repeats and --batch must be positive, --threads at least 0")
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    amp = torch.float16 if dev.type == "cuda" and not args.no_amp else None
    kernels = dict(nora._kernels)
    try:
        lines = [f"Benchmarks on {dev.type} ({torch.get_num_threads()} threads), median of {args.repeats} "
                 f"interleaved repeats after warm-up, torch {torch.__version__}.\n"]
        lines += memory_traffic(dev)
        lines += time_activations(dev, args.repeats)
        lines += [""] + model_rows(dev, args.repeats, args.batch, amp)
    finally:
        nora._kernels.update(kernels)
    text = "\n".join(lines)
    print(text)
    out = Path(args.out or f"bench-{dev.type}.md")
    nora.write_atomic(out, text + "\n")
    print(f"\nwrote {out}")
    return text


if __name__ == "__main__":
    main()
