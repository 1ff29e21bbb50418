"""Models from outside rna_core: a user's factory (`module:function`) and a weights file.

    spec = ExternalModel.parse("mypkg.nets:build", ["depth=18"])
    model = spec.load("weights.safetensors")       # built, weights loaded strictly, eval mode

The factory returns any ``torch.nn.Module`` that maps images in [0, 1] (N x C x H x W) to logits;
a model that expects standardised inputs wraps its own normalisation (e.g. an ``nn.Sequential``
of a normalising layer and the network). Randomized models follow :mod:`rna_core.randomness`.
Weights are a state dict saved with ``torch.save`` (read with ``torch.load(weights_only=True)``,
onto the CPU) or a ``.safetensors`` file; a dict holding the state dict under ``state_dict`` or
``model`` works too. Every mistake (module not importable, no such factory, malformed argument,
weights that do not fit) is one ConfigError naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import yaml

from .errors import CheckpointMismatchError, ConfigError
from .randomness import resample

_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
NESTED_KEYS = ("state_dict", "model")  # where checkpoints of other tools often keep the state dict


def parse_factory_args(items: Sequence[str]) -> dict[str, Any]:
    """`k=v` items as keyword arguments; values read as YAML scalars (`18` int, `true` bool, `a` str)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not _NAME.match(key):
            raise ConfigError(f"--factory-arg '{item}' is not NAME=VALUE with NAME a Python identifier; e.g. depth=18")
        if key in out:
            raise ConfigError(f"--factory-arg {key} is given twice")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            raise ConfigError(
                f"--factory-arg {key}: cannot read the value {raw!r}; quote text, e.g. {key}='a b'"
            ) from None
    return out


@dataclass(frozen=True)
class ExternalModel:
    """A user's model: `module:factory` called with `args`."""

    module: str
    factory: str
    args: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, factory_args: Sequence[str] = ()) -> ExternalModel:
        module, sep, factory = str(text).strip().partition(":")
        if not sep or not _MODULE.match(module) or not _NAME.match(factory):
            raise ConfigError(
                f"--model '{text}' is not MODULE:FACTORY; write e.g. --model mypkg.nets:build (a function or class "
                "that returns a torch.nn.Module)"
            )
        return cls(module, factory, parse_factory_args(factory_args))

    @property
    def name(self) -> str:
        return f"{self.module}:{self.factory}"

    @property
    def label(self) -> str:
        """The `method` of result rows: an external model, with its factory arguments."""
        if not self.args:
            return "external"
        return "external(" + ",".join(f"{k}={v}" for k, v in sorted(self.args.items())) + ")"

    def to_dict(self) -> dict[str, Any]:
        return {"module": self.module, "factory": self.factory, "args": dict(self.args)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExternalModel:
        return cls(str(d["module"]), str(d["factory"]), dict(d.get("args") or {}))

    def import_factory(self) -> Callable[..., Any]:
        """The factory, imported (the current folder and PYTHONPATH are searched, as `python -m` does)."""
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        try:
            mod = importlib.import_module(self.module)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"--model {self.name}: cannot import module '{self.module}' ({exc}); run from the folder that holds "
                "it or add that folder to PYTHONPATH"
            ) from None
        except Exception as exc:  # the user's module raised while importing
            raise ConfigError(
                f"--model {self.name}: importing '{self.module}' failed: {type(exc).__name__}: {exc}"
            ) from None
        fn = getattr(mod, self.factory, None)
        if fn is None or not callable(fn):
            public = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_"))[:12]
            raise ConfigError(
                f"--model {self.name}: module '{self.module}' has no callable '{self.factory}'; it has: "
                f"{', '.join(public) or 'none'}"
            )
        return fn

    def build(self) -> nn.Module:
        """The factory's module (weights as the factory leaves them)."""
        fn = self.import_factory()
        try:
            inspect.signature(fn).bind(**self.args)
        except TypeError as exc:
            raise ConfigError(
                f"--model {self.name}: the factory does not take these --factory-arg values: {exc}"
            ) from None
        except ValueError:  # no signature to check (a builtin): let the call say
            pass
        try:
            model = fn(**self.args)
        except Exception as exc:
            raise ConfigError(f"--model {self.name}: the factory raised {type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"--model {self.name}: the factory returned a {type(model).__name__}, not a torch.nn.Module"
            )
        return model

    def load(self, weights: str | os.PathLike) -> nn.Module:
        """The model with `weights` loaded strictly, in eval mode, on the CPU."""
        model = self.build()
        load_into(model, read_weights(weights), f"weights '{weights}'", self.name)
        return model.eval()

    def origin(self) -> Path | None:
        """Where the top-level package or module of `module` lives (a folder or a .py file), None if unknown."""
        top = self.module.split(".")[0]
        found = sys.modules.get(top)
        spec = getattr(found, "__spec__", None) if found is not None else importlib.util.find_spec(top)
        if spec is None:
            return None
        if spec.submodule_search_locations:  # a package (or namespace package): its folder
            locations = list(spec.submodule_search_locations)
            return Path(locations[0]).resolve() if len(locations) == 1 else None
        return Path(spec.origin).resolve() if spec.origin and spec.origin.endswith(".py") else None


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a ``torch.save`` file (``weights_only=True``, CPU)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"weights file '{path}' does not exist")
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(p), device="cpu"))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ConfigError(f"weights file '{path}' is not a readable safetensors file: {exc}") from None
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, weights_only refusals, truncated files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"weights file '{path}' cannot be read with torch.load(weights_only=True) ({first[:200]}); save "
            "model.state_dict() with torch.save, or use safetensors"
        ) from None
    return state_dict_of(payload, str(path))


def state_dict_of(payload: Any, where: str) -> dict[str, torch.Tensor]:
    """The tensors of a loaded weights file: the dict itself, or the one under `state_dict` / `model`."""
    if isinstance(payload, Mapping):
        for key in NESTED_KEYS:
            inner = payload.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
        if payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            return dict(payload)
    raise ConfigError(
        f"weights file '{where}' holds no state dict (a mapping of names to tensors, at the top or under "
        f"{' or '.join(NESTED_KEYS)}); save model.state_dict()"
    )


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], where: str, name: str) -> None:
    """`model.load_state_dict(state)`, strictly; a mismatch is one line naming the first offender."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {missing[0]}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(
                f"has {unexpected[0]} that the model does not"
                + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
            )
        hint = (
            " (saved from a DataParallel model? its names start with 'module.')"
            if any(k.startswith("module.") for k in unexpected)
            else ""
        )
        raise CheckpointMismatchError(f"{where} do not fit {name}: the file {' and '.join(parts)}{hint}")
    for key, tensor in own.items():
        got = tuple(state[key].shape)
        if got != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"{where} do not fit {name}: {key} has shape {list(got)}, the model needs {list(tensor.shape)}"
            )
    model.load_state_dict(state, strict=True)


def check_outputs(model: nn.Module, x: torch.Tensor, num_classes: int, name: str) -> None:
    """One forward (after a resample) on `x`: logits of shape (N, `num_classes`), else one ConfigError."""
    model.eval()
    try:
        resample(model, torch.Generator().manual_seed(0))
        with torch.no_grad():
            out = model(x)
    except Exception as exc:
        raise ConfigError(
            f"--model {name}: a forward on {tuple(x.shape)} images in [0, 1] failed: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(x), num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            f"--model {name}: its output is {shape}, but scoring needs logits of shape ({len(x)}, {num_classes}) "
            "for this dataset"
        )


__all__ = [
    "ExternalModel",
    "check_outputs",
    "load_into",
    "parse_factory_args",
    "read_weights",
    "state_dict_of",
]
