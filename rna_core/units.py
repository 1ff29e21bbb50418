"""Pixel units, converted here and nowhere else.

Configs and command lines write the L-inf radius and step sizes in pixels/255 (`eps: 8` is
8/255), as the papers do; attacks, the attack registry and result rows' thresholds work in
[0, 1] pixel space (every model standardises its own input). `fill_eps`, an L2 radius, is
written in [0, 1] units everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PIXEL_SETTINGS = ("eps", "step_size")  # attack settings written in pixels/255


def to_unit(pixels: float) -> float:
    """pixels/255 -> [0, 1] units: 8 -> 0.0314."""
    return float(pixels) / 255.0


def to_pixels(unit: float | None) -> float | None:
    """[0, 1] units -> pixels/255 (rounded to 6 decimals, so 8/255 reads back as 8.0)."""
    return None if unit is None else round(float(unit) * 255, 6)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def settings_to_unit(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Attack settings as written in configs (eps, step_size in pixels/255) -> as attacks take them."""
    return {k: to_unit(v) if k in PIXEL_SETTINGS and _number(v) else v for k, v in settings.items()}


def settings_to_pixels(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`settings_to_unit` (for names and logs)."""
    return {k: to_pixels(v) if k in PIXEL_SETTINGS and _number(v) else v for k, v in settings.items()}


__all__ = ["PIXEL_SETTINGS", "settings_to_pixels", "settings_to_unit", "to_pixels", "to_unit"]
