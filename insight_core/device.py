"""One device resolver for every model, stage and the app."""

from __future__ import annotations

import torch

from insight_core.errors import ConfigError


def resolve_device(device: str | torch.device = "auto", *, what: str = "device") -> torch.device:
    """'auto' -> CUDA when available, else CPU; any other torch device name is checked.

    ``what`` names the setting in the error (e.g. ``--device`` or ``BackboneConfig.device``).
    """
    if isinstance(device, torch.device):
        dev = device
    elif str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(str(device))
        except RuntimeError as err:
            raise ConfigError(f"{what}={device!r} is not a torch device: {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}={device!r} requested but CUDA is not available")
    return dev


def wants_cuda(device: str | torch.device) -> bool:
    """Whether ``device`` resolves to CUDA (without raising when CUDA is missing)."""
    if str(device) == "auto":
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"
