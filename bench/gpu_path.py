"""Training throughput of odenet-simple with the synchronising solver loop vs the device-side one.

Per variant, one process trains `--epochs` epochs (odenet.train.fit) and reports the last:
training images per second (the epoch's time less its validation time), FNFE and BNFE per
batch, and the FLOP per training image those imply for the ODE block's convolutions, so
that achieved TFLOP/s can be set against the device's peak (`--peak-tflops`):

    FLOP/image = conv FLOP x (FNFE + backward factor x BNFE)

where conv FLOP is 2 x multiply-adds of the block's convolutions for one image (from the
model's own layers), and each backward evaluation costs 3 (adjoint: f again, then its
vector-Jacobian products for input and weights) or 2 (direct: the two products) forward
evaluations. At width 64 that is ~20 forward and ~28 backward evaluations of a 66->66 3x3
convolution on 14x14, about 1.6 GFLOP per image.

    python -m bench.gpu_path --device cuda --width 64 --peak-tflops 67

One JSON object per variant on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from torch import nn

from odenet.config import RunConfig
from odenet.models import Classifier
from odenet.solvers import steps_per_sync
from odenet.train import fit, resolve_device


def conv_flop_per_image(model: Classifier, image_shape: tuple[int, int, int]) -> int:
    """FLOP (2 x multiply-adds) of one evaluation of the ODE blocks' convolutions for one image."""
    convolutions = [m for block in model.ode_blocks for m in block.dynamics.modules() if isinstance(m, nn.Conv2d)]
    flop = []

    def record(conv: nn.Conv2d, inputs, output: torch.Tensor) -> None:
        kh, kw = conv.kernel_size
        flop.append(2 * output[0].numel() * (conv.in_channels // conv.groups) * kh * kw)

    hooks = [conv.register_forward_hook(record) for conv in convolutions]
    try:
        # one evaluation: the first len(convolutions) calls of the solve's first f
        with torch.no_grad():
            model(torch.zeros(1, *image_shape, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return sum(flop[:len(convolutions)])


def measure(config: RunConfig, steps: int, peak_tflops: float | None) -> dict:
    device = resolve_device(config.device)
    with steps_per_sync(device.type, steps):
        fitted = fit(config)
    last = fitted.history[-1]
    # fit's epoch time includes validation; take it off where fit reports it
    train_s = last.epoch_time_s - last.val_time_s
    images_per_s = len(fitted.data.train) / train_s
    conv_flop = conv_flop_per_image(fitted.model, fitted.data.image_shape)
    backward_factor = 2 if config.adjoint == "direct" else 3
    flop_per_image = conv_flop * (last.fnfe + backward_factor * last.bnfe)
    tflops = images_per_s * flop_per_image / 1e12
    return {
        "variant": "synchronising" if steps == 1 else "device-side", "steps_per_sync": steps,
        "device": str(device), "width": config.width, "images": len(fitted.data.train),
        "batch_size": config.batch_size, "images_per_s": images_per_s, "fnfe": last.fnfe, "bnfe": last.bnfe,
        "conv_gflop_per_evaluation": conv_flop / 1e9, "gflop_per_image": flop_per_image / 1e9,
        "tflop_per_s": tflops, "fraction_of_peak": tflops / peak_tflops if peak_tflops else None,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-dir")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--subset", type=int, default=10_000, help="training images before the 80/20 split")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2, help="the last is measured (the first warms up)")
    parser.add_argument("--steps-per-sync", type=int, default=4, help="the device-side variant's K")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak, for the fraction of peak")
    args = parser.parse_args(argv)
    config = RunConfig.from_dict(dict(model="odenet-simple", dataset="fashion-mnist", data_dir=args.data_dir,
                                      subset=args.subset, width=args.width, batch_size=args.batch_size,
                                      max_epochs=args.epochs, patience=args.epochs, device=args.device,
                                      reevaluate=False))
    for steps in (1, args.steps_per_sync):
        print(json.dumps(measure(config, steps, args.peak_tflops)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
