"""Tuning methods: each a small typed config plus ``apply(model)``, chosen by ``class_path``."""

from grft_lightning.methods.base import Method
from grft_lightning.methods.adapter import Adapter
from grft_lightning.methods.baselines import BitFit, Full, Linear
from grft_lightning.methods.random_rows import RandomRows
from grft_lightning.methods.gps import GPS
from grft_lightning.methods.grft import GRFT
from grft_lightning.methods.lora import LoRA
from grft_lightning.methods.masked import GPSMasked
from grft_lightning.methods.dora import DoRA

__all__ = ["Method", "GRFT", "GPS", "Full", "Linear", "BitFit", "RandomRows", "LoRA", "DoRA", "Adapter",
           "GPSMasked", "REGISTRY", "method_class", "method_from_config"]

#: The methods a checkpoint, tuned file or ``selection.from_file`` may name, by class path (the
#: defining module's and the public ``grft_lightning.methods.<Name>``). A file never chooses what is
#: imported or called: a name outside this table is refused before anything else happens.
REGISTRY: dict[str, type[Method]] = {}
for _cls in (Full, Linear, BitFit, GRFT, RandomRows, GPS, GPSMasked, LoRA, DoRA, Adapter):
    REGISTRY[f"{_cls.__module__}.{_cls.__qualname__}"] = _cls
    REGISTRY[f"{__name__}.{_cls.__qualname__}"] = _cls
del _cls


def method_class(class_path: object, source: str = "the file") -> type[Method]:
    """The registered method class of ``class_path``; a ``ValueError`` naming ``source`` otherwise.

    Nothing is imported: the name is looked up in :data:`REGISTRY` only.
    """
    cls = REGISTRY.get(class_path) if isinstance(class_path, str) else None
    if cls is None:
        known = ", ".join(sorted({c.__qualname__ for c in REGISTRY.values()}))
        raise ValueError(f"{source}: names the method {str(class_path)[:120]!r}, which is not one of this "
                         f"package's methods ({known}); refusing to load it")
    return cls


def method_from_config(class_path: object, init_args: object, source: str = "the file") -> Method:
    """Build a registered method from a class path and JSON-like ``init_args``.

    The class must be in :data:`REGISTRY`, ``init_args`` a mapping whose keys are arguments of its
    ``__init__`` and whose values are plain JSON values (None, bool, int, float, str, lists and
    mappings of these); anything else is refused with a ``ValueError`` naming ``source``.
    """
    import inspect

    cls = method_class(class_path, source)
    if not isinstance(init_args, dict):
        raise ValueError(f"{source}: the arguments of {cls.__qualname__} must be a mapping, got "
                         f"{type(init_args).__name__}")
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(init_args) - accepted)
    if unknown:
        raise ValueError(f"{source}: {cls.__qualname__} takes no argument {unknown[0]!r} (accepted: "
                         f"{', '.join(sorted(accepted))})")
    for key, value in init_args.items():
        if not _plain_json(value):
            raise ValueError(f"{source}: {cls.__qualname__}.{key} must be a plain JSON value, got "
                             f"{type(value).__name__}")
    try:
        return cls(**init_args)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: cannot build {cls.__qualname__} from its saved arguments ({err})") from err


def _plain_json(value: object) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, list):
        return all(_plain_json(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(v) for k, v in value.items())
    return False
