"""Tuning methods: each a small typed config plus ``apply(model)``, chosen by ``class_path``."""

from grft_lightning.methods.base import Method
from grft_lightning.methods.adapter import Adapter
from grft_lightning.methods.baselines import BitFit, Full, Linear, RandomRows
from grft_lightning.methods.gps import GPS
from grft_lightning.methods.grft import GRFT
from grft_lightning.methods.lora import LoRA
from grft_lightning.methods.masked import GPSMasked

__all__ = ["Method", "GRFT", "GPS", "Full", "Linear", "BitFit", "RandomRows", "LoRA", "Adapter", "GPSMasked"]
