"""Train, validate, test or predict: ``python train.py fit --config configs/demo.yaml``."""

from grft_lightning.cli import cli_main

if __name__ == "__main__":
    cli_main()
