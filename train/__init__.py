"""The Lightning training app for handgrad networks.

    python -m train fit --config configs/digits.yaml          # train, test, write runs/digits/version_N/
    python -m train compare runs/seed_sgd runs/seed_batch     # two runs' curves on one figure

``train.model.Model`` (the LightningModule), ``train.data`` (the data modules),
``train.cli.TrainCLI`` (LightningCLI), ``train.callbacks`` (curves, predictions).
"""
from .cli import TrainCLI, main
from .data import DataError, Digits, FileData, Moons, SeedRegression, TabularData
from .model import Model, build_network

__all__ = ["TrainCLI", "main", "Model", "build_network", "DataError", "TabularData", "Digits", "Moons",
           "SeedRegression", "FileData"]
