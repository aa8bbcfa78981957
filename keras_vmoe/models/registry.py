"""The classes of each model family, and how their table presets are built.

A family package registers itself when it is imported (its `__init__.py`,
which Python runs before any of its modules): its backbone and classifier
classes (`register_family`), and the functions that build a model from a
name of its preset table (`register_preset_builder`; they live in the
family's `preset_builder.py`, which downloads, converts and upcycles
checkpoints). So the model classes' `from_preset` (`build_preset`) and the
modules that serve every family (`preset_io`, `shipped`) reach them without
importing them: dependencies point from the builders to the models, never
back. This module imports nothing.
"""

# family name ("ViTMoE") -> {"backbone": class, "classifier": class}.
_FAMILIES = {}
# model class -> builder(cls, name, load_weights, **kwargs).
_PRESET_BUILDERS = {}


def register_family(family, backbone, classifier):
    """Records the backbone and classifier classes of `family`."""
    _FAMILIES[family] = {"backbone": backbone, "classifier": classifier}


def family_class(family, role):
    """The registered `role` ("backbone" or "classifier") class of `family`.

    Raises:
        ValueError: naming `family` or `role` when nothing is registered.
    """
    if family not in _FAMILIES:
        raise ValueError(
            f"`family` must be a registered model family, one of "
            f"{sorted(_FAMILIES)}. Received: family={family!r}"
        )
    classes = _FAMILIES[family]
    if role not in classes:
        raise ValueError(
            f"`role` must be one of {sorted(classes)}. Received: role={role!r}"
        )
    return classes[role]


def register_preset_builder(cls, builder):
    """Makes `cls.from_preset(name)` build a table preset with `builder`.

    Args:
        cls: a model class; subclasses use the builder of their nearest
            registered base.
        builder: `builder(cls, name, load_weights, **kwargs)`, returning the
            model built from preset `name` (`cls` is the class whose
            `from_preset` was called).
    """
    if not callable(builder):
        raise TypeError(
            f"`builder` must be callable. Received: builder={builder!r}"
        )
    _PRESET_BUILDERS[cls] = builder


def build_preset(cls, name, load_weights=True, **kwargs):
    """Builds table preset `name` with the builder registered for `cls`.

    Raises:
        ValueError: naming `cls` when no builder is registered for it or
            its bases (its family package was not imported).
    """
    for klass in cls.__mro__:
        builder = _PRESET_BUILDERS.get(klass)
        if builder is not None:
            return builder(cls, name, load_weights, **kwargs)
    raise ValueError(
        f"No preset builder is registered for {cls.__name__}: import its "
        "model family package (e.g. `keras_vmoe.models`) first. Received: "
        f"cls={cls.__name__}, preset={name!r}"
    )
