"""Models that are not in the registry: your own architecture (``package.module:factory``) and TorchScript files.

The trust boundary, stated once: importing ``package.module`` runs that module's code (it is your code, on your
PYTHONPATH); a TorchScript file runs no Python (``torch.jit.load`` reads TorchScript code and tensors, never a pickled
Python object); state dicts and robust-enc checkpoints load with ``torch.load(weights_only=True)``, which refuses
anything but tensors and plain values. A TorchScript file is told apart by its zip's record names (a ``code/``
folder), without loading it: ``torch.load`` on one would warn and fail, and ``torch.jit.load`` on a pickle would too.
"""

from __future__ import annotations

import importlib
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from robust_enc.errors import UserError

TORCHSCRIPT = "torchscript"  # the --model value for a TorchScript file given as --weights
FACTORY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_.]*$")


def is_torchscript(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``): a zip holding ``<name>/code/`` records and
    ``constants.pkl``; a ``torch.save`` file has neither."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
    return any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names)


class Scripted(nn.Module):
    """A TorchScript model as a plain ``nn.Module``: a ScriptModule refuses ``requires_grad_``, which measuring calls
    (``models.frozen``); its parameters are ordinary tensors, reached through this wrapper."""

    def __init__(self, scripted: nn.Module) -> None:
        super().__init__()
        self.scripted = scripted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scripted(x)


def load_torchscript(path: str | Path) -> nn.Module:
    """A TorchScript model on the CPU in eval mode; a damaged file is one line."""
    with warnings.catch_warnings():
        # This torch marks torch.jit deprecated in favour of torch.export; the format still loads with torch alone.
        warnings.filterwarnings("ignore", category=FutureWarning)
        try:
            return Scripted(torch.jit.load(str(path), map_location="cpu")).eval()
        except Exception as err:  # torch raises RuntimeError and others for a damaged archive
            first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
            raise UserError(f"cannot load TorchScript file {path}: {first}") from None


@dataclass(frozen=True)
class Factory:
    """``package.module:callable``: an importable callable returning an ``nn.Module`` that takes images in [0, 1]
    and returns logits."""

    module: str
    name: str

    @classmethod
    def parse(cls, text: str) -> Factory | None:
        """The factory ``text`` names, or None when it is not of the form ``package.module:callable``."""
        if not FACTORY.match(text):
            return None
        module, _, name = text.partition(":")
        return cls(module, name)

    def __str__(self) -> str:
        return f"{self.module}:{self.name}"

    def resolve(self) -> Callable[[], nn.Module]:
        try:
            module = importlib.import_module(self.module)  # runs the module's code: the user's own, by design
        except ImportError as err:
            raise UserError(f"--model {self}: cannot import {self.module} ({err}); put its folder on PYTHONPATH or "
                            "install it") from None
        target: object = module
        for part in self.name.split("."):
            target = getattr(target, part, None)
            if target is None:
                raise UserError(f"--model {self}: {self.module} has no {self.name!r}") from None
        if not callable(target):
            raise UserError(f"--model {self}: {self.name} is not callable (give a function or class returning an "
                            "nn.Module)")
        return target  # type: ignore[return-value]

    def build(self) -> nn.Module:
        """Call the factory with no arguments; its result must be an ``nn.Module``."""
        try:
            model = self.resolve()()
        except UserError:
            raise
        except Exception as err:  # the user's code: anything can go wrong, and it is theirs to fix
            raise UserError(f"--model {self}: calling {self.name}() failed ({err.__class__.__name__}: {err})") from None
        if not isinstance(model, nn.Module):
            raise UserError(f"--model {self}: {self.name}() returned {type(model).__name__}, not an nn.Module")
        return model


def check_logits(model: nn.Module, input_shape: tuple[int, int, int], num_classes: int, source: str) -> None:
    """One forward pass of a blank image: the model must return logits [1, num_classes]; else one line."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.full((1, *input_shape), 0.5))
    except Exception as err:
        raise UserError(f"{source} fails on a {tuple(input_shape)} image in [0, 1] ({err.__class__.__name__}: "
                        f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"{source} returns {shape} for one image; the data set needs logits (1, {num_classes})")
