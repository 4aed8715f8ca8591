"""Train, validate, test or predict: ``python train.py fit --config configs/demo.yaml``."""

from grft_lightning.training.cli import main

if __name__ == "__main__":
    main()
