"""Differences between nested JSON dicts, leaf by leaf.

A foundation module (it imports nothing from gdiff): checkpoint fingerprints, resumable training
settings (gdiff/checkpoints/store.py) and run manifests (gdiff/engine/manifest.py) are all
compared with `changed_keys`.
"""

from __future__ import annotations

from typing import Any

# Stands for a key one side of `changed_keys` lacks.
MISSING = type("Missing", (), {"__repr__": lambda self: "(absent)"})()


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every leaf where two nested JSON dicts differ, in
    sorted key order; a key one side lacks has MISSING there. Fingerprints, resumable settings
    and sampling manifests are all compared this way."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new)):
            name = f"{prefix}.{key}" if prefix else str(key)
            out.extend(changed_keys(old.get(key, MISSING), new.get(key, MISSING), name))
        return out
    return [] if old == new else [(prefix, old, new)]
