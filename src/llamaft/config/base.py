"""The base of every config section (sections.py, preference.py): one place for the rules they share.

Every section forbids unknown keys (a typo is an error naming the key, see load.py), validates on
assignment, and reads YAML's bare on/off as the words the user typed.
"""

from __future__ import annotations

from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _on_off(cls, v: Any, info: ValidationInfo) -> Any:
        """YAML 1.1 reads a bare `on` / `off` (also yes/no) as a boolean: for the switches written
        `auto | on | off` that means the words the user typed, `true` -> "on", `false` -> "off"."""
        if isinstance(v, bool) and info.field_name:
            ann = cls.model_fields[info.field_name].annotation
            if get_origin(ann) is Literal and "off" in get_args(ann):
                return "on" if v else "off"
        return v
