"""Sample a trained flow: ``python sample.py runs/X -n 10000``."""

from flows.cli.sample import main

if __name__ == "__main__":
    main()
