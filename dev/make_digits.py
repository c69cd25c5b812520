"""Write scikit-learn's digits (1,797 real 8x8 images) as a CIFAR-10 python-format folder.

    pip install scikit-learn && python dev/make_digits.py data-digits
    python train_vit.py --data-root data-digits ...       # then use it like CIFAR-10

Development material only (the project does not depend on scikit-learn): it gives a small real
image task that installs offline, so NoRA can be studied on real pretrained features
(README, "Does NoRA help on real features?"). Each digit is upscaled to 32 px (nearest),
grey on all three channels; 1,297 images go to five training batches and 500 to the test batch,
chosen with a fixed seed.
"""
import pickle
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

root = Path(sys.argv[1] if len(sys.argv) > 1 else "data-digits") / "cifar-10-batches-py"
root.mkdir(parents=True, exist_ok=True)
digits = load_digits()
images = (digits.images / 16 * 255).round().astype(np.uint8)              # (1797, 8, 8)
images = images.repeat(4, axis=1).repeat(4, axis=2)                       # (1797, 32, 32)
data = np.repeat(images[:, None], 3, axis=1).reshape(len(images), -1)     # channel-major, like CIFAR
labels = digits.target.astype(int)
order = np.random.default_rng(0).permutation(len(images))
train, test = order[:1297], order[1297:]
for i, part in enumerate(np.array_split(train, 5), 1):
    with open(root / f"data_batch_{i}", "wb") as f:
        pickle.dump({"data": data[part], "labels": labels[part].tolist()}, f)
with open(root / "test_batch", "wb") as f:
    pickle.dump({"data": data[test], "labels": labels[test].tolist()}, f)
with open(root / "batches.meta", "wb") as f:
    pickle.dump({"label_names": [str(d) for d in range(10)]}, f)
print(f"wrote {len(train)} train and {len(test)} test digits to {root}")
