"""Shared by the fast-path CPU tests: a RunConfig from `section__key=value` overrides."""

from llamaft.config import config_from_dict


def cfg(**over):
    raw = {"model": {"name": "x"}, "data": {"train": ["t.jsonl"]}}
    for key, value in over.items():
        sec, name = key.split("__")
        raw.setdefault(sec, {})[name] = value
    return config_from_dict(raw)
