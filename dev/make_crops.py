"""Write 36 crops of the two photos that ship with scikit-learn as a .pt tensor of normalised images.

    pip install scikit-learn && python dev/make_crops.py crops.pt --size 56
    python fit_gelu.py --model vit_small_patch14_dinov2.lvd142m --weights WEIGHTS --img-size 56 --images crops.pt

Development material only: real photos that install offline, to measure where a pretrained ViT's
pre-activations lie and how much swapping GELU for its rational changes the model's output.
Each photo (427 x 640) gives a 3 x 6 grid of overlapping 140 px crops, resized to --size, normalised with the
ImageNet mean and std.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_sample_images

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import nora  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--size", type=int, default=56)
args = p.parse_args()
crops = []
for photo in load_sample_images().images:
    t = torch.from_numpy(photo.copy()).permute(2, 0, 1).float() / 255
    for i in range(3):
        for j in range(6):
            crops.append(t[:, 10 + i * 135:150 + i * 135, 10 + j * 95:150 + j * 95])
x = F.interpolate(torch.stack(crops), size=args.size, mode="bilinear", antialias=True, align_corners=False)
x = (x - torch.tensor(nora.IMAGENET_MEAN)[:, None, None]) / torch.tensor(nora.IMAGENET_STD)[:, None, None]
torch.save(x, args.out)
print(f"wrote {len(x)} crops of {args.size} px to {args.out}")
