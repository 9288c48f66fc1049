"""Whether IPUs are present: asked by `--backend auto` in every process, the launcher's included,
so it imports nothing but poptorch (and that only where the SDK installed it)."""
import importlib
import importlib.util


def ipu_hardware_available() -> bool:
    """Whether poptorch imports and reports IPU hardware; False without the SDK."""
    if importlib.util.find_spec("poptorch") is None:
        return False
    try:
        poptorch = importlib.import_module("poptorch")
    except (ImportError, OSError):  # the wheel is installed but the SDK is not enabled
        return False
    return bool(poptorch.ipuHardwareIsAvailable())
