"""``python -m train <fit|validate|test|predict|compare> ...`` (see ``train/cli.py``)."""
from .cli import main

if __name__ == "__main__":
    main()
