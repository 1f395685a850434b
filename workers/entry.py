"""The ``TorchTrainer`` entry point, in a module that imports nothing: the coordinator and the Ray Train
controller unpickle the trainer (and with it this function's module) but never call it, so neither pays
for importing the training code (torch, torchvision: ~6 s of CPU on a 2-core machine, on the critical
path of every ``fit``). Only the workers import ``workers.train``, when they run it."""

from __future__ import annotations


def train_loop_per_worker(config: dict) -> None:
    from workers.train import train_loop_per_worker as train

    train(config)
