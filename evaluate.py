"""Exact likelihood of a trained flow: ``accelerate launch evaluate.py runs/X [--split test]``."""

from flows.cli.evaluate import main

if __name__ == "__main__":
    main()
