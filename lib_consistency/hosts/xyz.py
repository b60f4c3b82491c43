"""X/Y/Z plot axes ``[Story] <name>``, one per ``axis_keys()`` entry (hosts.md §7).

``register_xyz_axes`` runs when the entry file is imported (``callbacks.on_import``, while the host loads scripts,
after the xyz script) and again from ``script_callbacks.on_before_ui``: either way before the xyz script builds its
axis list in ``ui()``, also with ``--nowebui``, where the API builds the scripts' UI before ``on_before_ui``. The
API's axis indices stay stable. An axis stores its value on the (shallow-copied) processing object of its cell, as
``p.consistent_story_overrides``, always as a new dict so cells never share one; the pipeline applies the overrides
with ``Settings.with_value`` (preset first), which also converts the "True"/"False" strings of on/off axes.
"""
from __future__ import annotations

from typing import Any

from ..settings import Settings, axis_keys, axis_label, option

OVERRIDES_ATTR = "consistent_story_overrides"
XYZ_MODULE_NAMES = {"xyz_grid.py", "scripts.xyz_grid"}  # the xyz script's module name in A1111 / Forge
BOOL_CHOICES = ["True", "False"]
_DEFAULTS = Settings()


def apply_override(p: Any, key: str, value: Any) -> None:
    """Record one axis value on ``p`` without mutating a dict that other cells' copies of ``p`` share."""
    setattr(p, OVERRIDES_ATTR, {**getattr(p, OVERRIDES_ATTR, {}), key: value})


def check_values(key: str, values: list) -> None:
    """Refuse axis values outside the option's choices or range before the grid starts (the xyz ``confirm``)."""
    opt, label = option(key), axis_label(key)
    allowed = axis_choices(key)
    for value in values:
        if allowed is not None:
            if value not in allowed:
                raise ValueError(f"{label}: {value!r} is not one of {', '.join(allowed)}")
        elif not opt.minimum <= _rounded(value) <= opt.maximum:
            raise ValueError(f"{label}: {value} is out of range [{opt.minimum}, {opt.maximum}]")


def axis_choices(key: str) -> list[str] | None:
    """The dropdown values of an axis (choices, or True/False), or None for a numeric axis."""
    if isinstance(getattr(_DEFAULTS, key), bool):
        return list(BOOL_CHOICES)
    return list(option(key).choices) or None


def axis_option(axis_option_class: type, key: str) -> Any:
    """One ``AxisOption`` for ``key``: str with choices for choices and on/off, int or float for numbers."""
    choices = axis_choices(key)
    value_type = str if choices is not None else type(getattr(_DEFAULTS, key))
    return axis_option_class(axis_label(key), value_type,
                             lambda p, value, all_values: apply_override(p, key, _rounded(value)),
                             confirm=lambda p, values: check_values(key, values),
                             choices=(lambda: axis_choices(key)) if choices is not None else None)


def _rounded(value: Any) -> Any:
    """Floats to 8 decimals, as xyz shows them: its range syntax yields 0.7999999999999999 for 0.8."""
    return round(value, 8) if isinstance(value, float) else value


def find_xyz_module() -> Any | None:
    """The loaded xyz_grid script module, or None when it is not loaded (disabled, or an unknown host)."""
    from modules import scripts

    return next((data.module for data in scripts.scripts_data
                 if data.script_class.__module__ in XYZ_MODULE_NAMES), None)


def register_xyz_axes(xyz: Any | None = None) -> int:
    """Add our axes to ``xyz.axis_options`` (the loaded xyz module by default); returns how many were added.

    Labels already present are skipped, so a script reload does not add them twice.
    """
    xyz = xyz if xyz is not None else find_xyz_module()
    if xyz is None:
        return 0
    present = {opt.label for opt in xyz.axis_options}
    added = [axis_option(xyz.AxisOption, key) for key in axis_keys() if axis_label(key) not in present]
    xyz.axis_options.extend(added)
    return len(added)
