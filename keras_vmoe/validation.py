"""Argument checks shared by the models, the training code and the CLI.

Every check raises where the value enters, with a message that names the
argument and the value received ("`name` must be ... Received:
name=value"), instead of letting a bad value fail later (NaN losses, shape
errors deep in a backend) or be dropped silently.
"""

import math
import numbers
import warnings

# Keyword arguments that `keras.Model` / KerasHub `Backbone` and `Task`
# accept (and that `get_config` / `from_config` / `from_preset` pass back).
MODEL_KWARGS = frozenset({"name", "trainable"})
TASK_KWARGS = frozenset({"name", "trainable", "compile"})


def check_number(
    name,
    value,
    minimum=None,
    maximum=None,
    min_inclusive=True,
    max_inclusive=True,
    allow_none=False,
):
    """A real, finite number in the given range; returns it unchanged.

    Args:
        name: the argument's name, for the message.
        value: the value received.
        minimum, maximum: bounds (None: unbounded).
        min_inclusive, max_inclusive: whether the bounds are allowed.
        allow_none: accept None.

    Raises:
        ValueError: naming `name` and `value`.
    """
    if value is None and allow_none:
        return value
    if (
        not isinstance(value, numbers.Real)
        or isinstance(value, bool)
        or not math.isfinite(value)
    ):
        raise ValueError(
            f"`{name}` must be a finite number. Received: {name}={value!r}"
        )
    low_ok = minimum is None or (
        value >= minimum if min_inclusive else value > minimum
    )
    high_ok = maximum is None or (
        value <= maximum if max_inclusive else value < maximum
    )
    if not (low_ok and high_ok):
        low = "-inf" if minimum is None else minimum
        high = "inf" if maximum is None else maximum
        interval = (
            ("[" if min_inclusive and minimum is not None else "(")
            + f"{low}, {high}"
            + ("]" if max_inclusive and maximum is not None else ")")
        )
        raise ValueError(
            f"`{name}` must be in {interval}. Received: {name}={value!r}"
        )
    return value


def check_int(name, value, minimum=1, allow_none=False):
    """An int (not bool) >= `minimum`; returns it unchanged.

    Raises:
        ValueError: naming `name` and `value`.
    """
    if value is None and allow_none:
        return value
    if (
        not isinstance(value, numbers.Integral)
        or isinstance(value, bool)
        or value < minimum
    ):
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"`{name}` must be {kind}. Received: {name}={value!r}")
    return value


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a `TypeError`, and a `ValueError` as
    for every other bad argument here."""


def check_bool(name, value):
    """A bool (not 0 / 1, not None); returns it unchanged.

    Raises:
        ArgumentTypeError: (a TypeError and a ValueError) naming `name`
            and `value`.
    """
    if not isinstance(value, bool):
        raise ArgumentTypeError(
            f"`{name}` must be a bool. Received: {name}={value!r}"
        )
    return value


def check_choice(name, value, choices):
    """One of `choices`; returns it unchanged.

    Raises:
        ValueError: naming `name`, the choices and `value`.
    """
    if value not in choices:
        raise ValueError(
            f"`{name}` must be one of {tuple(choices)}. Received: "
            f"{name}={value!r}"
        )
    return value


class UnknownArgumentError(TypeError, ValueError):
    """An unknown keyword argument: a `TypeError`, as Python raises for
    functions, and a `ValueError`, as for every other bad argument here."""


def check_no_unknown_kwargs(owner, kwargs, allowed=MODEL_KWARGS, hint=""):
    """Rejects keyword arguments `keras.Model` would accept or ignore.

    A misspelt argument (`num_expert=8`, `droput=0.5`) must not be swallowed
    by `**kwargs`.

    Args:
        owner: the class name, for the message.
        kwargs: the remaining keyword arguments.
        allowed: names passed on to the base class.
        hint: appended to the message.

    Raises:
        UnknownArgumentError: (a TypeError and a ValueError) naming every
            unknown argument and its value.
    """
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        received = ", ".join(f"{key}={kwargs[key]!r}" for key in unknown)
        raise UnknownArgumentError(
            f"{owner} got unexpected keyword argument(s) {unknown}{hint}. "
            f"Received: {received}"
        )


def check_head_args(backbone, backbone_cls, num_classes, dropout):
    """The arguments every keras-vmoe classifier head takes.

    Raises:
        ValueError: naming `backbone`, `num_classes` or `dropout` and the
            value received.
    """
    if not isinstance(backbone, backbone_cls):
        raise ValueError(
            f"`backbone` must be a {backbone_cls.__name__}. Received: "
            f"backbone={type(backbone).__name__}"
        )
    check_int("num_classes", num_classes)
    check_number(
        "dropout", dropout, minimum=0, maximum=1, max_inclusive=False
    )


# The release that removes the deprecated argument spellings.
REMOVAL_VERSION = "0.3"


def warn_deprecated(old, new, stacklevel=3):
    """Emits the `DeprecationWarning` of the argument `old`.

    Args:
        old: the deprecated argument's name.
        new: what to use instead, as it should read in the message.
        stacklevel: passed to `warnings.warn`; the default points at the
            caller of the function that calls this one.
    """
    warnings.warn(
        f"`{old}` is deprecated; use {new} instead. `{old}` will be removed "
        f"in keras-vmoe {REMOVAL_VERSION}.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


def deprecated_alias(old, old_value, new, new_value, new_default):
    """The value of argument `new`, given its deprecated alias `old`.

    `old_value=None` means the alias was not given. Given, it warns (a
    `DeprecationWarning` pointing at the caller's caller) and its value is
    used; giving both (`new_value` other than `new_default`) is an error.

    Raises:
        ValueError: naming both arguments and their values.
    """
    if old_value is None:
        return new_value
    if new_value != new_default:
        raise ValueError(
            f"`{old}` is a deprecated alias of `{new}`; pass `{new}` only. "
            f"Received: {new}={new_value!r}, {old}={old_value!r}"
        )
    warn_deprecated(old, f"`{new}`", stacklevel=4)
    return old_value
