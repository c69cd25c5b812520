"""Check the CUDA path of the paper-scale run before a lent GPU is spent on it (issue 29).

On the GPU (at most 8 minutes; no network; the device's own PyTorch, whatever its version):
    python3 dev/gpu_check.py --out $OUT        # the device has python3 and its own PyTorch
Dry run on a CPU, tiny sizes, the same code path (gloo instead of NCCL), a minute or two:
    python dev/gpu_check.py --device cpu --small --out /tmp/gc

Writes gpu_check.md and gpu_check.json (the same numbers) to --out after every check, so a run
killed at its timeout still returns what it measured. Sections, each check in its own try:
  1. correctness: compiled rational vs eager kernels vs float64 rational_reference (float32,
     bfloat16, float16; (N, L, C), (N, C, H, W), channels_last), float64 gradcheck, NoRA / LoRA /
     NoRA++ under float16 AMP + GradScaler, bfloat16 and TF32 vs float32, merge, adapter CPU <-> device;
  2. speed: rational forward + backward vs GELU, ViT-Tiny training steps (head only, LoRA, NoRA),
     the projected paper run, recompiles after warm-up;
  3. the flagship command (train_vit.py, random weights) on a random CIFAR-10-format folder;
  4. torchrun: train_vit.py in one process, and a DDP probe on NCCL (gloo on a CPU).
"""
import argparse
import contextlib
import json
import logging
import math
import os
import pickle
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import nora  # noqa: E402
import train_vit as tv  # noqa: E402
import bench  # noqa: E402  (dev/bench.py)

SIZES = {  # every size: "full" on the GPU, "small" (--small) for the CPU dry run
    "full": dict(check=(32, 197, 768), check_nchw=(32, 768, 14, 14), act=(256, 197, 768), model_batch=32,
                 model_img=224, vit_batch=256, other_batches=(128, 200), repeats=5, train_images=50_000,
                 test_images=2_000, steps=200, log_every=50, batch=256, torchrun_steps=5, threads=0, flags=[]),
    "small": dict(check=(2, 197, 768), check_nchw=(2, 768, 7, 7), act=(8, 197, 768), model_batch=4,
                  model_img=32, vit_batch=2, other_batches=(3, 5), repeats=2, train_images=400,
                  test_images=50, steps=10, log_every=5, batch=4, torchrun_steps=3, threads=1,
                  flags=["--img-size", "32", "--batch-size", "4", "--threads", "1"]),
}
VIT_IMG = 224                   # bench.time_models' image size, which the recompile check shares
BUDGET, HARD_END = 420, 470     # seconds: no section starts after BUDGET, every subprocess ends by HARD_END
PAPER_IMAGES, PAPER_EVAL = 50 * 50_000, 50 * 10_000   # the paper's run: 50 epochs, each with a test pass
RATIONAL_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}   # a few ulps of the output
# vs float32; bfloat16 keeps 8 bits: at 224 px (batch 8, CPU) NoRA's A_Q gradients, sums that cancel, came out
# 1.2% off in float16 and 7% in bfloat16; wrong casts or overflow are off by far more, or not finite
AMP_TOL = {"float16": 0.05, "bfloat16": 0.2, "tf32": 0.05}
T0 = time.time()
KERNELS = {"eager": dict(nora._EAGER)}   # nora's kernel tables, to switch between; "compiled" once compiled


def use(kind):
    nora._kernels.update(KERNELS[kind])


def log(text):
    print(f"[{time.time() - T0:4.0f}s] {text}", flush=True)


def fmt(v):
    return "-" if v is None else f"{v:.2g}" if isinstance(v, float) else str(v)


def err(a, b, floor=1.0):
    """max |a - b| / max(floor, max |b|): with floor 1, absolute for small values, relative for large."""
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(floor)).item()


class Report:
    """The checks and numbers so far, rewritten to gpu_check.md and .json after every check."""

    def __init__(self, out, dev, small):
        self.out, self.dev, self.checks, self.data, self.notes = Path(out), dev, [], {}, []
        try:
            import triton
            triton = triton.__version__
        except Exception:
            triton = None
        self.header = dict(device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.machine()})",
                           torch=torch.__version__, cuda=torch.version.cuda, triton=triton,
                           cudnn=torch.backends.cudnn.version() if dev.type == "cuda" else None,
                           python=platform.python_version(), threads=torch.get_num_threads(),
                           command=" ".join(["python", *sys.argv]), sizes="small" if small else "full")

    def check(self, name, diff, tol, ok, note=""):
        self.checks.append(dict(check=name, diff=diff, tol=tol, result="PASS" if ok else "FAIL", note=note))
        log(f"{self.checks[-1]['result']}  {name}  diff {fmt(diff)}  tol {fmt(tol)}  {note}")
        self.write()

    def guard(self, name, fn, *args):
        """Run a check; an exception (an older PyTorch, a CUDA error) becomes its ERROR line."""
        try:
            fn(*args)
        except Exception as e:
            self.checks.append(dict(check=name, diff=None, tol=None, result="ERROR", note=f"{type(e).__name__}: {e}"[:300]))
            log(f"ERROR {name}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=4)}")
            self.write()

    def goals(self):
        d, first = self.data, [c for c in self.checks if c["check"].startswith("1.")]
        ratio = max([v["compiled"] / v["gelu"] for v in d.get("activation", {}).values() if "compiled" in v], default=None)
        nora_lora = d["vit"]["NoRA"]["step"] / d["vit"]["LoRA"]["step"] if "vit" in d else None
        minutes, recompiles = d.get("projected_minutes", 0) + d.get("eval_minutes", 0), d.get("recompiles")
        rows = [("every correctness line passes", f"{sum(c['result'] == 'PASS' for c in first)} of {len(first)}",
                 first and all(c["result"] == "PASS" for c in first)),
                ("compiled rational fwd + bwd <= 1.5x GELU", ratio and f"{ratio:.2f}x (worst dtype)", ratio and ratio <= 1.5),
                ("NoRA training step <= LoRA's", nora_lora and f"{nora_lora:.2f}x LoRA", nora_lora and nora_lora <= 1),
                ("paper run projected < 15 min", "projected_minutes" in d and f"{minutes:.1f} min, " + ("50 evaluations "
                 "included" if "eval_minutes" in d else "training only") + f" ({d['projected_from']})",
                 "projected_minutes" in d and minutes < 15),
                ("no recompiles after warm-up", recompiles is not None and str(recompiles), recompiles == 0)]
        return [(g, m or "not measured", "met" if ok else "NOT MET" if m else "-") for g, m, ok in rows]

    def write(self):
        h, d = self.header, self.data
        md = [f"# gpu_check on {h['device']}", "", f"torch {h['torch']}, CUDA {h['cuda']}, cuDNN {h['cudnn']}, Triton "
              f"{h['triton']}, Python {h['python']}, {h['threads']} CPU threads; {h['sizes']} sizes; {time.time() - T0:.0f} s.  ",
              f"Command: `{h['command']}`", ""]
        if self.dev.type != "cuda":
            md += ["A CPU dry run: the goals are for the GPU; here they only show that every number is produced.", ""]
        md += ["## Goals", "", "| goal | measured | |", "|---|---|---|", *(f"| {g} | {m} | {ok} |" for g, m, ok in self.goals()),
               "", "## Checks", "", "Rational lines: max |a - b| / max(1, max |b|) over the output and the gradients of x, "
               "numerator and denominator, the worst of the pairs named. AMP lines: the same for the loss, and max |g - g32| "
               "/ max |g32| for each trainable parameter's gradient, the worst of them.", "",
               "| check | max difference | tolerance | result |", "|---|---|---|---|"]
        md += [f"| {c['check']} | {fmt(c['diff'])} | {fmt(c['tol'])} | {c['result']}"
               + (f" ({c['note']})" if c["note"] else "").replace("|", "/").replace("\n", " ") + " |" for c in self.checks]
        if "activation" in d:
            md += ["", "## Speed", "", f"The rational (G = 8) forward + backward against GELU on {d['act']}, median of "
                   f"{d['repeats']} interleaved repeats:", "",
                   "| input | GELU ms | eager ms | x GELU | compiled ms | x GELU |", "|---|---|---|---|---|---|"]
            md += [f"| {k} | {v['gelu'] * 1e3:.2f} | {v['eager'] * 1e3:.2f} | {v['eager'] / v['gelu']:.2f} | " + (
                   f"{v['compiled'] * 1e3:.2f} | {v['compiled'] / v['gelu']:.2f} |" if "compiled" in v else "- | - |")
                   for k, v in d["activation"].items()]
        if "vit" in d:
            md += ["", f"ViT-Tiny training step (bench.time_models), {VIT_IMG} px, batch {d['vit_batch']}, "
                   f"{d['vit_amp']} autocast, {d['vit_kernels']} rational:", "", "| method | step ms | img/s | x LoRA | "
                   + ("peak memory" if self.dev.type == "cuda" else "saved for backward") + " MB | x LoRA |", "|---|---|---|---|---|---|"]
            lora = d["vit"]["LoRA"]
            md += [f"| {k} | {v['step'] * 1e3:.1f} | {v['img_s']:.0f} | {v['step'] / lora['step']:.2f} | "
                   f"{v['memory'] / 2**20:.0f} | {v['memory'] / lora['memory']:.2f} |" for k, v in d["vit"].items()]
        if "projected_minutes" in d:
            md += ["", f"Projected paper run: {PAPER_IMAGES:,} training images at {d['projected_rate']:.0f} img/s "
                   f"({d['projected_from']}) = {d['projected_minutes']:.1f} min" + (
                       f", plus ~{d['eval_minutes']:.1f} min for {PAPER_EVAL:,} test images (NoRA's forward above)"
                       if "eval_minutes" in d else "") + "."]
        if "recompiles" in d:
            md += ["", f"Recompiles after warm-up: {d['recompiles']} new graphs ({d['recompile_frames']} frames compiled) "
                   f"while NoRA trained and inferred at batches {d['recompile_batches']}.", *(f"- {r}" for r in d["recompile_reasons"])]
        for key, title in (("flagship", "3. Flagship command"), ("torchrun", "4. torchrun")):
            for i, run in enumerate(d.get(key, [])):
                md += ["", f"## {title}"] * (i == 0) + ["", f"`{run['command']}`", "",
                       ", ".join(f"{k} {v}" for k, v in run["summary"].items()), "", "```", *run["tail"], "```"]
        md += [f"\n{n}" for n in self.notes]
        nora.write_atomic(self.out / "gpu_check.md", "\n".join(md) + "\n")
        nora.write_atomic(self.out / "gpu_check.json", json.dumps(dict(header=h, checks=self.checks, data=d, goals=self.goals(),
                                                                   notes=self.notes, seconds=round(time.time() - T0, 1)),
                                                              indent=1, default=str))


# --- 1. correctness ------------------------------------------------------------------------------

def correctness(rep, dev, S):
    t = time.time()
    compiled = tv.use_compiled_rational(device=dev)
    rep.check("1. use_compiled_rational compiles", None, None, compiled,
              f"{time.time() - t:.0f} s" if compiled else "torch.compile failed: see the warning in the console")
    if compiled:
        KERNELS["compiled"] = dict(nora._kernels)
    g = torch.Generator().manual_seed(0)
    num, den = (torch.tensor(c, dtype=torch.float64).repeat(8, 1) for c in nora.GELU_COEFFS)
    num = num * (1 + 0.1 * torch.randn(num.shape, generator=g, dtype=torch.float64))    # groups that differ
    den = den * (1 + 0.1 * torch.randn(den.shape, generator=g, dtype=torch.float64))
    den[:, 0] += 0.02 * torch.randn(8, generator=g, dtype=torch.float64)              # and an S that changes sign
    num, den = num.float(), den.float()                  # as NoRA passes them; the reference gets the same values
    layouts = {"(N, L, C)": (S["check"], -1, None), "(N, C, H, W)": (S["check_nchw"], 1, None),
               "(N, C, H, W) channels_last": (S["check_nchw"], 1, torch.channels_last)}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, (shape, dim, layout) in layouts.items():
            rep.guard(f"1. rational {str(dtype)[6:]} {name}", rational_check, rep, dev, dtype, name, shape, dim, layout,
                      num, den, g)
    use("eager")                                          # gradcheck: the eager kernels in float64
    rep.guard("1. gradcheck", gradcheck, rep, dev, g)
    use("compiled" if compiled else "eager")              # the rest as training runs it
    for method in ("nora", "lora", "nora++"):
        reference = []
        for mode in ("float16", "bfloat16", "tf32"):
            rep.guard(f"1. {method}: {mode} vs float32", amp_check, rep, dev, S, method, mode, reference)
    rep.guard("1. merge", merge_check, rep, dev, S)
    rep.guard("1. adapter round trip", round_trip, rep, dev, S)


def run_rational(fn, x, num, den, gy):
    x, num, den = (t.detach().requires_grad_() for t in (x, num, den))
    y = fn(x, num, den)
    y.backward(gy)
    return [y.detach(), x.grad, num.grad, den.grad]


def rational_check(rep, dev, dtype, name, shape, dim, layout, num, den, g):
    x = (torch.randn(shape, generator=g) * 3).to(dev, dtype)
    x = x.contiguous(memory_format=layout) if layout else x
    gy = torch.randn(shape, generator=g).to(dev, dtype)
    reference = lambda x, n, d: nora.rational_reference(x.movedim(dim, -1), n, d).movedim(-1, dim)
    ref = run_rational(reference, x.double(), num.double().to(dev), den.double().to(dev), gy.double())
    out = {}
    for kind in KERNELS:
        use(kind)
        out[kind] = run_rational(lambda x, n, d: nora.rational(x, n, d, dim=dim), x, num.to(dev), den.to(dev), gy)
    diffs = {f"{k} vs reference": max(map(err, v, ref)) for k, v in out.items()}
    if "compiled" in out:
        diffs["compiled vs eager"] = max(map(err, out["compiled"], out["eager"]))
    worst = max(diffs.values())
    rep.check(f"1. rational {str(dtype)[6:]} {name}: {', '.join(diffs)}", worst, RATIONAL_TOL[dtype],
              worst <= RATIONAL_TOL[dtype] and "compiled" in out and out["compiled"][0].dtype == dtype,
              ", ".join(f"{v:.1e}" for v in diffs.values()) + ("" if "compiled" in out else "; not compiled"))


def gradcheck(rep, dev, g):
    x = torch.randn(3, 5, 16, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    num, den = ((torch.randn(4, k, generator=g, dtype=torch.float64) * 0.5).to(dev).requires_grad_() for k in (6, 4))
    xc = torch.randn(2, 16, 3, 3, generator=g, dtype=torch.float64).to(dev).requires_grad_()
    ok = (torch.autograd.gradcheck(nora.rational, (x, num, den))
          and torch.autograd.gradcheck(lambda x, n, d: nora.rational(x, n, d, dim=1), (xc, num, den)))
    rep.check("1. gradcheck, float64, eager kernels, dim -1 and 1", None, "gradcheck's", ok)


@contextlib.contextmanager
def precision(tf32):
    """float32 matmuls and convolutions in TF32, or not (cuDNN's flag does nothing on a CPU)."""
    old = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old[0])
        torch.backends.cudnn.allow_tf32 = old[1]


def build(method, dev, S):
    """ViT-Tiny prepared for ``method``, B matrices nonzero (else A has no gradient), built on the CPU
    from seed 0: the same model on any device."""
    torch.manual_seed(0)
    model = tv.prepare(nora.VisionTransformer("tiny", img_size=S["model_img"], num_classes=10), method)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(("B_P", "B_Q", "lora_B")):
                p.normal_(0, 0.1)
    return model.to(dev)


def batch(dev, S):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(S["model_batch"], 3, S["model_img"], S["model_img"], generator=g)
    return x.to(dev), torch.randint(0, 10, (S["model_batch"],), generator=g).to(dev)


def grad_scaler(dev, enabled):
    """train_vit's scaler (initial scale 2^10); torch.cuda's own before torch 2.3."""
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(dev.type, init_scale=2.0 ** 10, enabled=enabled)
    return torch.cuda.amp.GradScaler(init_scale=2.0 ** 10, enabled=enabled and dev.type == "cuda")


def train_step(dev, S, method, mode):
    """One AdamW step as train_vit takes it: (loss, unscaled gradients, whether the step was taken)."""
    model, (x, y) = build(method, dev, S), batch(dev, S)
    amp = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(mode)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt, scaler = torch.optim.AdamW(params.values(), lr=1e-3), grad_scaler(dev, mode == "float16")
    with precision(mode == "tf32"):
        with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)                              # the true gradients (nothing when disabled)
        grads = {n: p.grad.detach().float().clone() for n, p in params.items()}
        before = [p.detach().clone() for p in params.values()]
        scaler.step(opt)
        scaler.update()
    return loss.detach().float(), grads, all(not torch.equal(a, p) for a, p in zip(before, params.values()))


def amp_check(rep, dev, S, method, mode, reference):
    reference[:] = reference or train_step(dev, S, method, "float32")   # once per method
    loss, grads, stepped = train_step(dev, S, method, mode)
    finite = bool(torch.isfinite(loss)) and all(torch.isfinite(v).all() for v in grads.values())
    diff = max([err(loss, reference[0])] + [err(v, reference[1][n], 1e-30) for n, v in grads.items()])
    what = {"float16": "float16 autocast + GradScaler", "bfloat16": "bfloat16 autocast", "tf32": "float32 in TF32"}[mode]
    rep.check(f"1. {method}: {what} vs float32, batch {S['model_batch']} at {S['model_img']} px", diff, AMP_TOL[mode],
              finite and stepped and diff <= AMP_TOL[mode], "" if finite and stepped else
              "non-finite values" if not finite else "the optimizer step was skipped")


def merge_check(rep, dev, S):
    model, (x, _) = build("nora++", dev, S).eval(), batch(dev, S)
    with torch.no_grad(), precision(False):
        before = model(x)
        diff = err(nora.merge(model)(x), before)
    rep.check("1. merge, NoRA++, float32: output after vs before", diff, 1e-4, diff <= 1e-4)


def round_trip(rep, dev, S):
    """save_adapter on the device, load_adapter into the same adapters on a plain model on the CPU, and back again."""
    cpu = torch.device("cpu")
    model, (x, _) = build("nora++", dev, S).eval(), batch(dev, S)

    def plain(device, path):                              # the same backbone (seed 0) and adapters, the file's tensors
        torch.manual_seed(0)
        vit = tv.prepare(nora.VisionTransformer("tiny", img_size=S["model_img"], num_classes=10), "nora++")
        return nora.load_adapter(vit.to(device).eval(), path)
    with torch.no_grad(), precision(False), tempfile.TemporaryDirectory() as folder:
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.01)       # as if trained: unlike a fresh build
        on_dev = all(v.device.type == dev.type for v in nora.adapter_state_dict(model).values())
        nora.save_adapter(model, f"{folder}/a.safetensors")
        there = plain(cpu, f"{folder}/a.safetensors")
        nora.save_adapter(there, f"{folder}/b.safetensors")
        back = plain(dev, f"{folder}/b.safetensors")
        want, to_cpu, to_dev = model(x), there(x.to(cpu)), back(x)
    diff = err(to_cpu, want.to(cpu))
    rep.check(f"1. adapter {dev.type} -> cpu: output", diff, 1e-4, on_dev and diff <= 1e-4,
              "" if on_dev else "adapter_state_dict's tensors were not on the device")
    rep.check(f"1. adapter cpu -> {dev.type}: output", err(to_dev, want), 1e-6, err(to_dev, want) <= 1e-6)


# --- 2. speed ------------------------------------------------------------------------------------

def speed(rep, dev, S):
    use("compiled" if "compiled" in KERNELS else "eager")
    amp = torch.float16 if dev.type == "cuda" else None  # as train_vit: float16 AMP on a GPU,
    with precision(True):                                # TF32 for what stays float32
        rep.guard("2. rational vs GELU", activation_speed, rep, dev, S)
        rep.guard("2. ViT-Tiny training steps", vit_speed, rep, dev, S, amp)
        rep.guard("2. recompiles after warm-up", recompiles, rep, dev, S, amp)


def activation_speed(rep, dev, S):
    num, den = (torch.tensor(c, device=dev).repeat(8, 1).requires_grad_() for c in nora.GELU_COEFFS)
    rep.data.update(activation={}, act=S["act"], repeats=S["repeats"])
    for dtype in (torch.float32, torch.float16):
        x0 = torch.randn(S["act"], device=dev, dtype=dtype)
        gy = torch.randn_like(x0)

        def step(kind):
            def run():
                x = x0.detach().requires_grad_()
                if kind == "gelu":
                    F.gelu(x).backward(gy)
                else:
                    use(kind)
                    nora.rational(x, num, den).backward(gy)
            return run
        times = bench.medians({k: step(k) for k in ["gelu", *KERNELS]}, S["repeats"], dev)
        rep.data["activation"][str(dtype)[6:]] = times
        log(f"rational vs GELU, {dtype}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()))
    use("compiled" if "compiled" in KERNELS else "eager")


def vit_speed(rep, dev, S, amp):
    r = bench.time_models(dev, S["repeats"], S["vit_batch"], amp, {"head only": "head", "LoRA": "lora", "NoRA": "nora"})
    for v in r.values():
        v["img_s"] = S["vit_batch"] / v["step"]
    rep.data.update(vit=r, vit_batch=S["vit_batch"], vit_amp=str(amp)[6:] if amp else "no",
                    vit_kernels="eager" if nora._kernels["chunk"] else "compiled",
                    eval_minutes=PAPER_EVAL * r["NoRA"]["forward"] / 60)
    project(rep, r["NoRA"]["img_s"], "NoRA's training step here, synthetic data")
    log("ViT-Tiny steps: " + ", ".join(f"{k} {v['step'] * 1e3:.1f} ms ({v['img_s']:.0f} img/s)" for k, v in r.items()))


def project(rep, rate, source):
    rep.data.update(projected_rate=rate, projected_from=source, projected_minutes=PAPER_IMAGES / rate / 60)


def recompiles(rep, dev, S, amp):
    """New graphs while NoRA trains and infers at other batch sizes after a warm-up at the timed one,
    and the guard failures behind them, from torch._logging where this PyTorch has it."""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = tv.prepare(nora.VisionTransformer("tiny", img_size=VIT_IMG, num_classes=10), "nora").to(dev)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(b):
        x, y = torch.randn(b, 3, VIT_IMG, VIT_IMG, device=dev), torch.randint(0, 10, (b,), device=dev)
        with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(model(x), y)
            with torch.no_grad():
                model.eval()(x)                           # inference: a forward with no backward
        model.train()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step(S["vit_batch"])
    reasons, handler, loggers = [], logging.Handler(), []
    handler.emit = lambda r: reasons.append(r.getMessage().replace("\n", " ")[:300])
    with contextlib.suppress(Exception):                  # an older PyTorch: the counts alone
        torch._logging.set_logs(recompiles=True)
        loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict) if n.endswith("__recompiles")]
    for lg in loggers:
        lg.addHandler(handler)
    before = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    try:
        for b in S["other_batches"]:
            step(b)
    finally:
        for lg in loggers:
            lg.removeHandler(handler)
        with contextlib.suppress(Exception):
            torch._logging.set_logs()
    rep.data.update(recompiles=counters["stats"]["unique_graphs"] - before[0], recompile_reasons=reasons,
                    recompile_frames=counters["frames"]["total"] - before[1], recompile_batches=list(S["other_batches"]))
    log(f"recompiles after warm-up: {rep.data['recompiles']}")


# --- 3. and 4. the flagship command and torchrun, as subprocesses -----------------------------------

def cifar_folder(tmp, S):
    """A CIFAR-10 python-format folder of random images, as train_vit.load_cifar reads it; returns its root."""
    path = Path(tmp) / "cifar-10-batches-py"
    if not path.is_dir():
        path.mkdir()
        rng = np.random.default_rng(0)
        for name, n in [(f"data_batch_{i}", S["train_images"] // 5) for i in range(1, 6)] + [("test_batch", S["test_images"])]:
            with open(path / name, "wb") as f:
                pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                             "labels": rng.integers(0, 10, n).tolist()}, f)
    return tmp


def run_logged(rep, key, cmd, timeout):
    """Run ``cmd`` from the repository root, timing each output line as it arrives; past ``timeout``
    (or HARD_END) its whole process group is killed. Returns (exit code or 'timeout', lines)."""
    timeout = max(10, min(timeout, HARD_END - (time.time() - T0)))
    log(f"running, {timeout:.0f} s at most: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend((time.time(), s.rstrip("\n")) for s in proc.stdout), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = f"timeout after {timeout:.0f} s"
        proc.wait()
    reader.join(5)
    rep.data.setdefault(key, []).append(dict(command=" ".join(["python", *cmd[1:]]), summary={},
                                             tail=[s for _, s in lines[-15:]]))
    return rc, lines


STEP = re.compile(r"step (\d+)/\d+\s+loss (\S+)\s+(\d+) img/s")


def summarise(rc, lines, batch):
    """Exit code, losses, img/s and accuracy from train_vit's output. The steady img/s is timed between the
    step lines before the first evaluation, by their arrival: train_vit's own averages from the start,
    compiling included."""
    steps = [(t, int(m[1]), float(m[2]), int(m[3])) for t, s in lines for m in [STEP.search(s)] if m]
    first_eval = next((t for t, s in lines if re.search(r"epoch \d+: \w+ accuracy", s)), math.inf)
    early = [s for s in steps if s[0] < first_eval]
    accuracy = [float(m[1]) for _, s in lines for m in [re.search(r"RESULT .*accuracy=([\d.]+)%", s)] if m]
    diverged = any(re.search(r"loss is (nan|-?inf)", s) for _, s in lines)     # train_vit's Diverged
    out = dict(exit=rc, steps=steps[-1][1] if steps else 0, losses_finite=not diverged and all(math.isfinite(s[2]) for s in steps),
               last_loss=steps[-1][2] if steps else None, reported_img_s=steps[-1][3] if steps else None,
               results=len(accuracy), accuracy=accuracy[-1] if accuracy else None)
    if len(early) >= 2 and early[-1][0] > early[0][0]:
        out["steady_img_s"] = round((early[-1][1] - early[0][1]) * batch / (early[-1][0] - early[0][0]))
    return out


def train_command(dev, S, tmp, steps, log_every):
    return ["train_vit.py", "--data-root", cifar_folder(tmp, S), "--weights", "none", "--steps", str(steps),
            "--log-every", str(log_every), "--no-download", "--device", dev.type, *S["flags"]]


def flagship(rep, dev, S, tmp):
    start = time.time()
    rc, lines = run_logged(rep, "flagship", [sys.executable, *train_command(dev, S, tmp, S["steps"], S["log_every"])], 300)
    s = rep.data["flagship"][-1]["summary"] = dict(summarise(rc, lines, S["batch"]), seconds=round(time.time() - start))
    rep.check(f"3. flagship: {S['steps']} steps, exit code 0, a RESULT line", None, None, rc == 0 and s["results"] == 1,
              f"exit {rc}, {s['steps']} steps, {s['seconds']} s")
    rep.check("3. flagship: every logged loss finite", None, None, s["losses_finite"] and s["steps"] > 0,
              f"last loss {s['last_loss']}")
    if s.get("steady_img_s"):
        project(rep, s["steady_img_s"], "the flagship command's steady img/s")
        rep.write()


def torchrun(rep, dev, S, tmp):
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    rc, lines = run_logged(rep, "torchrun", [*launch, *train_command(dev, S, tmp, S["torchrun_steps"], 1)], 150)
    s = rep.data["torchrun"][-1]["summary"] = summarise(rc, lines, S["batch"])
    rep.check("4. torchrun train_vit.py, 1 process (it joins no process group at world size 1)", None, None,
              rc == 0 and s["results"] == 1 and s["losses_finite"], f"exit {rc}, {s['steps']} steps")
    # so NCCL and DDP run in this probe instead: the same model, AMP and compiled rational
    probe = [*launch, "dev/gpu_check.py", "--ddp-probe", "--device", dev.type, *(["--small"] if S is SIZES["small"] else [])]
    rc, lines = run_logged(rep, "torchrun", probe, 150)
    said = [s for _, s in lines if s.startswith("DDP-PROBE")]
    rep.data["torchrun"][-1]["summary"] = dict(exit=rc, probe=said[-1] if said else None)
    rep.check(f"4. DDP probe on {'nccl' if dev.type == 'cuda' else 'gloo'}: 3 NoRA steps under DDP", None, None,
              rc == 0 and said[-1:] != [] and " ok " in said[-1], f"exit {rc}")


def ddp_probe(dev, S):
    """Run by torchrun: join the process group (NCCL on a GPU) and take NoRA training steps under DDP
    with AMP and the compiled rational, as train_vit does with more than one process."""
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    torch.distributed.init_process_group(backend)
    try:
        tv.use_compiled_rational(device=dev)
        model, (x, y), losses = build("nora", dev, S), batch(dev, S), []
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[dev] if dev.type == "cuda" else None,
                                                        broadcast_buffers=False)
        amp = torch.float16 if dev.type == "cuda" else None
        opt, scaler = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3), grad_scaler(dev, amp is not None)
        for _ in range(3):
            with torch.autocast(dev.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                loss = F.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss = loss.detach().float()
            torch.distributed.all_reduce(loss)
            losses.append(loss.item() / torch.distributed.get_world_size())
        ok = all(math.isfinite(v) for v in losses)
        print(f"DDP-PROBE {'ok' if ok else 'bad'} backend={backend} world={torch.distributed.get_world_size()} "
              f"losses={[round(v, 4) for v in losses]}", flush=True)
    finally:
        torch.distributed.destroy_process_group()


# --- the command line ------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="folder for gpu_check.md and gpu_check.json (made if missing)")
    p.add_argument("--device", default="cuda", help="default: cuda; cpu for the dry run")
    p.add_argument("--small", action="store_true", help="tiny sizes, for the CPU dry run")
    p.add_argument("--ddp-probe", action="store_true", help=argparse.SUPPRESS)   # section 4 runs it under torchrun
    args = p.parse_args(argv)
    dev, S = torch.device(args.device), SIZES["small" if args.small else "full"]
    if dev.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine has no CUDA device (the dry run: --device cpu --small)")
    if S["threads"]:                                     # tiny ops on a shared CPU: one thread waits least
        torch.set_num_threads(S["threads"])
    if args.ddp_probe:
        return ddp_probe(dev, S)
    if not args.out:
        p.error("--out is required")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rep = Report(args.out, dev, args.small)
    log(f"gpu_check on {rep.header['device']}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    rep.write()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for title, section, extra in (("1. correctness", correctness, ()), ("2. speed", speed, ()),
                                      ("3. flagship", flagship, (tmp,)), ("4. torchrun", torchrun, (tmp,))):
            if time.time() - T0 > BUDGET:
                rep.notes.append(f"Section {title} was not started: the {BUDGET} s budget was spent.")
                log(rep.notes[-1])
            else:
                log(f"--- {title}")
                rep.guard(title, section, rep, dev, S, *extra)
            rep.write()
    log(f"done in {time.time() - T0:.0f} s: {Path(args.out) / 'gpu_check.md'}")
    return rep


if __name__ == "__main__":
    main()
