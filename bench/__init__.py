"""handgrad against native PyTorch: `python -m bench --help`."""
