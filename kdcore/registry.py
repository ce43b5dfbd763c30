"""Method registry: each method module registers its class under a short name, as timm does for models."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kdcore.methods.base import AnomalyMethod

_METHODS: dict[str, type["AnomalyMethod"]] = {}


def register_method(cls: type["AnomalyMethod"]) -> type["AnomalyMethod"]:
    """Class decorator: make ``cls`` available to ``create_method(cls.name)``."""
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method name '{cls.name}' is registered twice")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Registry names of every available method, sorted."""
    _import_builtin_methods()
    return sorted(_METHODS)


def list_trainable_methods() -> list[str]:
    """The methods that train on a dataset from parameters alone (not ``ensemble``, which combines trained models)."""
    return [name for name in list_methods() if not _METHODS[name].combines_models]


def get_method_class(name: str) -> type["AnomalyMethod"]:
    _import_builtin_methods()
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method '{name}'; available: {', '.join(_METHODS)}") from None


def create_method(name: str, **params) -> "AnomalyMethod":
    """A new, unfitted method; ``params`` are validated at once (unknown names and bad values raise ValueError)."""
    return get_method_class(name)(**params)


def check_params(name: str, params: dict) -> None:
    """Validate ``params`` for method ``name`` without building it (what queueing a job checks first)."""
    get_method_class(name).make_config(params)


# What every training is given (the CLI's own flags, the Train page's common fields); the rest are options.
TRAINING_PARAMS = ("size", "epochs", "batch_size", "backbone", "weights", "device", "seed")


def method_options(name: str) -> dict[str, object]:
    """The parameters of method ``name`` beyond ``TRAINING_PARAMS``, with their defaults (None: decided by the
    method, e.g. by a preset): what ``--set KEY=VALUE`` and the Train page's options change."""
    return {f.name: f.default for f in dataclasses.fields(get_method_class(name).Config)
            if f.name not in TRAINING_PARAMS}


def option_help(name: str) -> dict[str, str]:
    """What each of ``method_options(name)`` does, in the words of the comment on its field in the method's
    Config (or a base's; the subclass's wins), for tooltips and ``--help``-like listings. Options without a
    comment are left out."""
    options = method_options(name)
    found: dict[str, str] = {}
    for config_class in reversed(get_method_class(name).Config.__mro__):
        if dataclasses.is_dataclass(config_class):
            found.update({key: text for key, text in _field_comments(config_class).items() if key in options})
    return found


_CLASS_BODY_LINE = re.compile(r"^    (?:# ?(?P<comment>.*)|(?P<field>\w+)\s*:[^#]*(?:#\s*(?P<inline>.*))?)$")


@functools.cache  # read from the source once per class, not on every rerun of the Train page
def _field_comments(config_class: type) -> dict[str, str]:
    """Field name -> the ``#`` comment lines right above it in the class body (or its inline comment)."""
    try:
        lines = inspect.getsource(config_class).splitlines()
    except (OSError, TypeError):  # no source shipped, e.g. a frozen application
        return {}
    comments, pending = {}, []
    for line in lines:
        match = _CLASS_BODY_LINE.match(line.rstrip())
        if match and match["comment"] is not None:
            pending.append(match["comment"].strip())
            continue
        if match and match["field"]:
            text = " ".join(pending + ([match["inline"].strip()] if match["inline"] else []))
            if text:
                comments[match["field"]] = text
        pending = []
    return comments


def parse_param_value(text: str):
    """A parameter typed as text: JSON where it parses as JSON (``800``, ``true``, ``[8, 16]``), else the text
    itself (``cosine``); the method's Config then checks its kind and range."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _import_builtin_methods() -> None:
    # Imported lazily so that `import kdcore` stays cheap and free of import cycles.
    import kdcore.methods  # noqa: F401  (each module registers itself on import)
