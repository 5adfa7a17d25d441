"""The Lightning training app for handgrad networks.

    python -m train fit --config configs/digits.yaml          # train, test, write runs/digits/version_N/
    python -m train compare runs/seed_sgd runs/seed_batch     # two runs' curves on one figure

``train.model.Model`` (the LightningModule), ``train.data`` (the data modules),
``train.cli.TrainCLI`` (LightningCLI), ``train.callbacks`` (checkpoints, curves, console lines,
predictions), ``train.errors`` (what stops a run with one line).
"""
from .cli import TrainCLI, main
from .errors import ConfigError
from .data import DataError, Digits, FileData, Moons, SeedRegression, TabularData
from .model import Model, build_network

__all__ = ["TrainCLI", "main", "Model", "build_network", "ConfigError", "DataError", "TabularData", "Digits", "Moons",
           "SeedRegression", "FileData"]
