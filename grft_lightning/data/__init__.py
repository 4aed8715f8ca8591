"""DataModules, one per benchmark family, all built on :class:`ImageClassificationData`."""

from grft_lightning.data.base import ImageClassificationData
from grft_lightning.data.fgvc import FGVC
from grft_lightning.data.mnist import MNISTDigits
from grft_lightning.data.synthetic import SyntheticImages
from grft_lightning.data.vtab import VTAB1k

__all__ = ["FGVC", "ImageClassificationData", "MNISTDigits", "SyntheticImages", "VTAB1k"]
