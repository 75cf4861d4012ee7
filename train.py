"""Train a flow: ``accelerate launch train.py [--config configs/X.yaml] [key=value ...]``."""

from flows.cli.train import main

if __name__ == "__main__":
    main()
