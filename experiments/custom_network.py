"""Your own residual network, trained layer-parallel: a squeeze-and-excitation ResNet on digits.

auxpar ships ResNets and WRNs; this file defines a network it does not ship and trains it with
the penalty method on K = 2 stages (one process each), first through the Python API, then
prints the equivalent command line:

    python experiments/custom_network.py                   # the API (starts 2 processes itself)
    python -m auxpar train --model experiments.custom_network:make_net \\
        --method penalty --stages 2 --epochs 5 --lr 0.1 --out runs/se-penalty   # the CLI, from the repo root

What auxpar needs from a network: a stem, a list of residual blocks and a head
(``make_net`` returns them as a tuple; shapes are measured by one dry forward). Each block
maps one tensor to one tensor; that is all the penalty, AL, pipeline, serial and DDP methods
need. Blocks that subclass ``auxpar.ResidualBlock`` (``residual`` + ``shortcut``) also run
under ``--method mgrit``, which scales the residual branch by a step h on its coarse grids.

``make_net`` is a module-level function (the worker processes import it by name) and builds the
same network every time it is called after the same ``torch.manual_seed`` (every rank builds
the whole network from the run's seed and keeps its stage).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import auxpar


class SEBlock(auxpar.ResidualBlock):
    """Pre-activation block with squeeze-and-excitation (Hu et al. 2018):
    ``x -> shortcut(x) + h * se(conv3x3(relu(bn(conv3x3(relu(bn(x)))))))``, where ``se`` rescales
    every channel by a gate computed from the channel means; a block that changes the shape
    projects the shortcut with a strided 1x1 convolution."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1, reduction: int = 4) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        hidden = max(c_out // reduction, 2)
        self.se_down = nn.Linear(c_out, hidden)
        self.se_up = nn.Linear(hidden, c_out)
        self.proj = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False) if (stride != 1 or c_in != c_out) else None

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        r = self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))
        gate = torch.sigmoid(self.se_up(F.relu(self.se_down(r.mean((2, 3))))))  # (B, C) channel weights
        return r * gate[:, :, None, None]

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.proj is None else self.proj(x)


def make_net(in_channels: int, num_classes: int, width: int = 16):
    """stem -> 3 SE blocks at ``width`` -> a strided SE block to 2*width -> 2 more -> head
    (PyTorch's default initialization, drawn from torch's RNG: the same net for the same seed)."""
    stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
    blocks = [SEBlock(width, width) for _ in range(3)]
    blocks += [SEBlock(width, 2 * width, stride=2)] + [SEBlock(2 * width, 2 * width) for _ in range(2)]
    head = nn.Sequential(nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(2 * width, num_classes))
    return stem, blocks, head


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="penalty")
    p.add_argument("--stages", type=int, default=2)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--train-subset", type=int, default=0, help="fixed stratified training subset (0 = all)")
    p.add_argument("--out", default="runs/se-penalty-digits")
    args = p.parse_args()
    summary = auxpar.train(model=make_net, data="digits", method=args.method, stages=args.stages,
                           epochs=args.epochs, lr=args.lr, out=args.out, overwrite=True,
                           **{"data.train_subset": args.train_subset})
    print(f"{summary['method']} on {summary['stages']} stage(s), split {summary['split']}: "
          f"test accuracy {100 * summary['final_test_acc']:.1f}% after {summary['epochs']} epochs")
    print("the same run from the command line (repo root): python -m auxpar train --model "
          f"experiments.custom_network:make_net --method {args.method} --stages {args.stages} "
          f"--epochs {args.epochs} --lr {args.lr} --set data.train_subset={args.train_subset} --out {args.out} --overwrite")


if __name__ == "__main__":  # required: the processes auxpar starts import this file
    main()
