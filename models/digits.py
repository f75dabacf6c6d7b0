"""`digits`: a small CNN on scikit-learn's bundled handwritten digits (real data, offline).

The 8x8 images are upsampled to 32x32 inside the model, so the signature stays the raw 8x8 grid
of pixel values 0..16 that the dataset (and a client) has; the trained weights ship with the
package (`weights/digits.pt`) and `python -m kiln.models.digits` retrains them deterministically.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from kiln.core.signature import Signature, TensorSpec
from kiln.models.base import Dataset, ExportHints, ModelBundle

WEIGHTS = Path(__file__).resolve().parent / "weights" / "digits.pt"
SEED = 0
TEST_FRACTION = 0.25
SIGNATURE = Signature(
    inputs=(TensorSpec("image", "float32", ("batch", 1, 8, 8)),),
    outputs=(TensorSpec("logits", "float32", ("batch", 10)),),
)


def build_module():
    import torch
    from torch import nn

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()

            def block(cin: int, cout: int) -> list[nn.Module]:
                return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

            self.features = nn.Sequential(
                nn.Upsample(scale_factor=4, mode="nearest"),
                *block(1, 32), *block(32, 64), nn.MaxPool2d(2),
                *block(64, 64), *block(64, 128), nn.MaxPool2d(2),
                nn.MaxPool2d(2), nn.Flatten(),
            )
            self.classifier = nn.Sequential(nn.Dropout(0.25), nn.Linear(128 * 4 * 4, 10))

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(image / 16.0))

    return DigitsCNN()


def splits() -> tuple[Dataset, Dataset]:
    """The fixed train/test split; the test part is held out from training and fine-tuning."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SEED, stratify=y
    )
    return Dataset({"image": x_train}, y_train), Dataset({"image": x_test}, y_test)


def train_classifier_(module, data: Dataset, epochs: int, lr: float = 3e-3, seed: int = SEED,
                      progress: bool = False, label: str = "train") -> None:
    """Train in place (AdamW, one-cycle, random one-pixel shifts); deterministic for a given seed."""
    import torch
    from torch import nn

    batch_size = 32
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(data.inputs["image"])
    y = torch.from_numpy(data.labels)
    optimizer = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max(1, steps), pct_start=0.15)
    module.train()
    for epoch in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            padded = nn.functional.pad(x[idx], (1, 1, 1, 1))
            offsets = torch.randint(0, 3, (len(idx), 2), generator=generator).tolist()
            xb = torch.stack([padded[j, :, a:a + 8, b:b + 8] for j, (a, b) in enumerate(offsets)])
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(module(xb), y[idx])
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach()) * len(idx)
        if progress:
            print(f"  {label} epoch {epoch + 1}/{epochs}: loss {total / len(x):.4f} "
                  f"({time.perf_counter() - start:.1f}s)", file=sys.stderr, flush=True)
    module.eval()


def accuracy(module, data: Dataset) -> float:
    import torch

    with torch.inference_mode():
        logits = module(torch.from_numpy(data.inputs["image"]))
    return float((logits.argmax(1).numpy() == data.labels).mean())


def load() -> ModelBundle:
    import torch

    train, test = splits()
    module = build_module()
    if not WEIGHTS.exists():
        train_weights(progress=True)
    module.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    module.eval()
    return ModelBundle(
        name="digits",
        module=module,
        signature=SIGNATURE,
        task="classification",
        source={"zoo": "digits"},
        calibration=train.take(slice(0, 256)),
        evaluation=test,
        training=train,
        fine_tune=lambda module, epochs: train_classifier_(
            module, train, epochs=epochs, lr=1e-3, progress=True, label="fine-tune"),
        preprocessing={"kind": "image", "description": "8x8 grey image, pixel values 0..16 (scikit-learn digits)"},
        hints=ExportHints(recommended_variants=(
            "torchscript-fp32", "torchscript-bf16", "onnx-fp32", "onnx-int8", "pruned-onnx-int8", "ov-int8",
        )),
    )


def train_weights(epochs: int = 10, progress: bool = True) -> float:
    """Retrain the shipped checkpoint; returns its held-out accuracy."""
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    train, test = splits()
    module = build_module()
    train_classifier_(module, train, epochs=epochs, progress=progress)
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), WEIGHTS)
    return accuracy(module, test)


if __name__ == "__main__":
    acc = train_weights()
    print(f"digits: held-out accuracy {acc:.4f}; weights written to {WEIGHTS}")
