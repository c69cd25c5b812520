"""Research sweeps on top of train_vit.py: each method at its own learning rate, chosen on validation.

    python dev/sweeps.py study $DINO --epochs 5          # each method at its best lr, then over seeds
    python dev/sweeps.py stability $DINO --steps 32      # NoRA over lr x groups x rank, against head-only
    python dev/sweeps.py frontier $DINO --steps 400 --out dev/frontier-runs.json --plot dev/frontier.svg
    python dev/sweeps.py frontier $DINO --steps 400 --out dev/frontier-runs.json --plot dev/frontier.svg --redraw

Every train_vit.py flag works here too ($DINO: the dev task's, dev/RESULTS.md). Each run is
appended to --out (default results.json) as it finishes and read back from there, so an
interrupted sweep resumes where it stopped, and --redraw writes the frontier's table and figure
from --out alone. The lr is always chosen on a validation split carved from the training set,
never on the test set. Results and the commands that made them: dev/RESULTS.md.
"""
import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fit_gelu  # noqa: E402
import nora  # noqa: E402
import train_vit as tv  # noqa: E402

# Learning rates tried per method in --table study; each method's best is chosen on a validation
# split carved from the training set (never on the test set), then run again with more seeds.
# The head's lr is chosen first (row 'head'); every other method keeps the head at that lr and
# sweeps the lr of its own parameters (train_vit.param_groups); nora++ keeps NoRA at row 'nora's lr
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
    val[tv.balanced_subset(y, max(1, round(fraction * len(y))), 12345)] = True
    return x[~val], y[~val], x[val], y[val]


# Settings that make two runs the same run: a sweep finds a run already in --out by these and
# reads it back instead of training it again, so an interrupted table resumes where it stopped.
# The weights count by their content (a sha256), so the same file under another path resumes; the
# data by its folder; the autocast dtype because it changes the numbers.
RUN_SETTINGS = tv.SAVED_SETTINGS + ("lora_rank", "lr", "head_lr", "nora_lr", "weight_decay", "weights_sha256", "data_root",
                                    "amp", "epochs", "steps", "batch_size", "train_subset", "test_subset", "val_fraction", "seed")


def trial(args, split, test=None, train_now=True, **changes):
    """One run of a sweep (study, stability, frontier): train on the validation split's training
    part with ``changes`` applied to args; its record, with 'validation' and 'test' accuracies (None
    when the loss stopped being finite; 'test' also when ``test`` is None). A run already in --out
    is read back; one that is not is trained, or with ``train_now=False`` returned as None."""
    run_args = argparse.Namespace(**{**vars(args), **changes})
    key = json.loads(json.dumps({k: getattr(run_args, k) for k in RUN_SETTINGS}, default=str))   # as JSON has it
    done = shared(args, lambda: next((rec for rec in tv.read_records(args.out) if "validation" in rec and
                                      {k: rec.get(k) for k in RUN_SETTINGS} == key and
                                      (test is None or rec["test"] is not None or rec["validation"] is None)), None))
    if done is not None:
        return done
    if not train_now:
        return None
    try:
        model, result = tv.train(run_args, split, eval_name="validation")
        result["validation"] = result["accuracy"]
        result["test"] = None if test is None else tv.evaluate(model, *test, tv.input_pipeline(run_args), args.batch_size, args.amp)
    except tv.Diverged as e:
        print(f"  diverged: {e}")
        result = dict(validation=None, test=None)
    rec = {**key, **result, "table": args.table}
    print(f"RESULT {run_args.method} lr {run_args.lr:g} seed {run_args.seed}: validation {fmt(rec['validation'])}"
          + ("" if test is None else f", test {fmt(rec['test'])}"), flush=True)
    tv.append_record(args, rec)
    return rec


def shared(args, decide):
    """decide() on rank 0, sent to every process under torchrun, so that only rank 0 reads the runs
    file and all processes take the same decision."""
    value = [decide() if args.process == 0 else None]
    if args.world > 1:
        torch.distributed.broadcast_object_list(value, src=0)
    return value[0]


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
    tv.write_table(args, "study", f"""
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
    tv.write_table(args, "stability", f"""
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
    "full": dict(method="full", lrs=(3e-6, 1e-5, 3e-5), choose={}, check=[], sizes=[{}], head_lr=tv.HEAD_LR),
    "nora++": dict(method="nora++", lrs=(3e-4, 1e-3, 3e-3), choose={}, check=[], sizes=[{}], head_lr=tv.HEAD_LR),
    "vpt": dict(method="vpt", lrs=(1e-3, 5e-3, 2e-2), choose={}, check=[], sizes=[{}], head_lr=tv.HEAD_LR),
    "nora-group": dict(method="nora-group", lrs=(3e-3, 1e-2, 3e-2), choose=dict(groups=8, rank=2),
                       check=[dict(groups=64, rank=2)], sizes=[dict(groups=8, rank=2), dict(groups=64, rank=2)],
                       head_lr=tv.HEAD_LR),
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
        colour = fit_gelu.hue(k * 360 / 7)
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
    nora.write_atomic(path, "\n".join(out + ["</svg>"]) + "\n")
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
    tv.write_table(args, "frontier", f"""
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
        if args.process == 0:
            plot_frontier(args.plot, curves, summary.get(("head", ""), (None,))[0])


def describe(args):
    """The run settings that a sweep's table states in its caption."""
    steps = f"{args.steps} steps" if args.steps else f"{args.epochs} epochs"
    return (f"{args.img_size} px, {steps}, batch {args.batch_size}, weights {Path(str(args.weights or args.model)).name}, "
            f"NoRA basis_scale {args.basis_scale or tv.BASIS_SCALE:g}.")


SWEEPS = {"study": study, "stability": stability, "frontier": frontier}


def parse_args(argv=None):
    p = tv.make_parser()
    p.description, p.usage = __doc__, None
    p.add_argument("sweep", choices=SWEEPS, help="which sweep to run")
    g = p.add_argument_group("sweeps")
    g.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of the training set held out to choose lrs on (default: 0.2)")
    g.add_argument("--seeds", type=int, default=3, help="seeds at each chosen lr, scored on test (default: 3)")
    g.add_argument("--rows", type=lambda v: v.split(","),
                   help="study, frontier: only these rows (families), e.g. head,lora,nora (default: all)")
    g.add_argument("--plot", help="frontier: draw test accuracy against trainable parameters into this .svg")
    g.add_argument("--redraw", action="store_true",
                   help="frontier: train nothing; write the table and --plot from the runs already in --out")
    p.set_defaults(out="results.json")
    args = tv.parse_args(argv, p, outputs=("--plot",))
    if args.table or args.save or args.eval_adapter or args.plot_activations or args.method != p.get_default("method"):
        p.error("a sweep chooses its own runs: --table, --method, --save, --eval-adapter and --plot-activations "
                "belong to train_vit.py")
    if args.seeds <= 0 or not 0 < args.val_fraction < 1:
        p.error(f"--seeds must be positive and --val-fraction in (0, 1); got {args.seeds}, {args.val_fraction}")
    rows = {"study": STUDY, "frontier": FRONTIER}.get(args.sweep, {})
    if args.rows and (not rows or set(args.rows) - set(rows)):
        p.error(f"--rows goes with study or frontier and names their rows ({list(rows) or list(STUDY)}), got {args.rows}")
    if args.rows and "head" not in args.rows and not args.head_lr:
        p.error("--rows without 'head' needs --head-lr: every other row trains the head at the head row's lr")
    if args.rows and "nora++" in args.rows and "nora" not in args.rows and not args.nora_lr:
        p.error("--rows with nora++ but not nora needs --nora-lr: nora++ trains NoRA at the nora row's lr")
    if (args.plot or args.redraw) and args.sweep != "frontier":
        p.error("--plot and --redraw go with the frontier")
    args.table = args.sweep                             # recorded with every run, and names the table file
    args.weights_sha256 = weights_fingerprint(p, args.weights or args.model)
    return args


def weights_fingerprint(p, weights):
    """The sha256 of a local weights file; a hub name, a URL or 'none' stands for itself."""
    if weights == "none" or weights in nora.PRETRAINED or str(weights).startswith(("http://", "https://")):
        return weights
    if not Path(weights).is_file():
        p.error(f"--weights {weights}: no such file")
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv=None):
    args = parse_args(argv)
    with tv.session(args):
        if args.redraw:                                 # no data, no training: the runs file alone
            return frontier(args, None, train_now=False)
        return SWEEPS[args.sweep](args, tv.load_data(args))


if __name__ == "__main__":
    main()
