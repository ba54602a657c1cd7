"""Reading a meta-classifier's `.keras` archive without running code from it.

A registered model's files can be replaced by whoever may write the artifact store. Keras' safe
mode refuses Lambda layers, but an explicit `safe_mode=True` does not override a process-wide
`keras.config.enable_unsafe_deserialization()`, and a config may name any importable class. So
every object the archive's `config.json` names is first checked against the model kind's own list
(those of Keras 3.15), then the archive is loaded in safe mode without compiling it (prediction
needs no optimizer or loss). Anything else is a one-line DataError naming the file.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from nws.errors import DataError, one_line


def named_objects(node: Any) -> Iterator[str]:
    """`module.class` of every object a Keras config names, however deeply nested."""
    if isinstance(node, dict):
        if "class_name" in node:
            yield ".".join(str(part) for part in (node.get("module"), node["class_name"]) if part is not None)
        node = list(node.values())
    if isinstance(node, list):
        for value in node:
            yield from named_objects(value)


def save_keras(model: Any, path: Path, with_optimizer: bool) -> None:
    """Save a functional Keras model as a `.keras` file: by default the inference model only (its
    layers and weights, no compile settings, no optimizer state: Adam's two moments per weight
    would triple the file), with `with_optimizer` as trained."""
    import keras

    if with_optimizer:
        model.save(path)
    else:
        keras.Model(model.inputs, model.outputs, name=model.name).save(path)


def load_checked(path: Path, allowed: frozenset[str], kind: str) -> Any:
    """The Keras model in `path`, when its config names only `allowed` objects (`kind` says what
    the model is, for the error line)."""
    import keras

    try:
        with zipfile.ZipFile(path) as archive:
            strangers = sorted(set(named_objects(json.loads(archive.read("config.json")))) - allowed)
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, RecursionError) as e:
        raise DataError(f"{path.name}: not a Keras archive ({one_line(e)})") from None
    if strangers:
        raise DataError(f"{path.name}: names objects {kind} is not made of: {', '.join(strangers)}")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as e:  # Keras' reader of untrusted input: any failure means a bad file
        raise DataError(f"{path.name}: cannot be loaded ({one_line(e)})") from None
