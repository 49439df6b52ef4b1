"""Settings: a config field that is also a command-line flag (its default, help text and allowed range),
the check every config runs on itself, and the way between flags and config dataclasses.
Pure Python: no argparse parsing, no file I/O (add_settings only declares flags on a parser)."""
import argparse
import re
from dataclasses import field, fields

from utils import ProjectError


def setting(default, help, rule=None, choices=None, metavar=None):
    """A config field that is also a command-line setting: its default, its help text and the values
    it allows (rule: '>= a', '> a' or an interval such as 'in [0, 1)'; choices: the allowed values).
    train.py makes each flag from its field, and every config checks itself (check_settings), so a
    new setting is one field plus its use."""
    return field(default=default, metadata={"help": help, "rule": rule, "choices": choices, "metavar": metavar})


def _obeys(value, rule):
    """Whether a number meets `rule` ('>= a', '> a', 'in [a, b)' and the like); NaN never does."""
    if rule.startswith("in "):
        lo, hi = (float(b) for b in rule[4:-1].split(", "))
        return (value >= lo if rule[3] == "[" else value > lo) and (value <= hi if rule[-1] == "]" else value < hi)
    op, bound = rule.split()
    return value >= float(bound) if op == ">=" else value > float(bound)


KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _is_kind(value, kind):
    """isinstance, except that bool is not an int (nor a float) here and an int is a fine float."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, kind) or kind is float and isinstance(value, int)


def check_settings(cfg):
    """Raise ValueError naming the first field of the dataclass `cfg` whose value has the wrong type
    or breaks its rule or choices (a field whose default is None may also be None)."""
    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None and f.default is None:
            continue
        if f.type is tuple:  # image_size: a tuple of integers
            items, ok = value, isinstance(value, tuple) and all(_is_kind(v, int) for v in value)
        else:
            items, ok = [value], _is_kind(value, f.type)
        if not ok:
            raise ValueError(f"{f.name} must be {'integers' if f.type is tuple else KIND_NAMES[f.type]}, got {value!r}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")
        if meta.get("rule") and not all(_obeys(v, meta["rule"]) for v in items):
            rule = meta["rule"]
            need = f"satisfy {f.name} {rule}" if rule.startswith("in ") else f"be {rule}"
            raise ValueError(f"{f.name} must {need}, got {value!r}")



def setting_names(cls, prefix=""):
    """The flag names of the settings of the dataclass `cls` (its fields made by modules.setting)."""
    return [prefix + f.name for f in fields(cls) if "help" in f.metadata]


def add_settings(parser, cls, prefix=""):
    """A flag --<prefix><field> for every setting of the dataclass `cls` (see modules.setting): typed
    from the field's annotation, with its help text, choices and default. The parser itself keeps no
    defaults, so the parsed flags are exactly those typed (on resume a typed --lr 0.001 is a request
    even when 0.001 is the default); settings_from fills in the rest."""
    for f in fields(cls):
        meta = f.metadata
        if "help" not in meta:  # derived, not a setting (e.g. the prior's code-map size)
            continue
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        kw = {"help": f"{meta['help']} (default: {shown})", "default": argparse.SUPPRESS}
        if f.type is bool:  # a setting on by default is turned off by --no-<name>
            action = argparse.BooleanOptionalAction if f.default else "store_true"
            parser.add_argument(f"--{prefix}{f.name}", action=action, **kw)
        else:
            # A tuple takes as many numbers as its metavar names (image_size: H W), or one or more (per level).
            nargs = (len(meta["metavar"]) if isinstance(meta["metavar"], tuple) else "+") if f.type is tuple else None
            parser.add_argument(f"--{prefix}{f.name}", type=int if f.type is tuple else f.type, choices=meta["choices"],
                                nargs=nargs, metavar=meta["metavar"], **kw)


def settings_from(cls, flags, prefix="", make=None):
    """The dataclass `cls` (or what make(**fields) builds) from flat flags {flag name: value}; settings
    absent from `flags` take their defaults. A value the config refuses is a ProjectError that names
    the flags, as the user types them."""
    names = setting_names(cls)
    try:
        return (make or cls)(**{n: flags[prefix + n] for n in names if prefix + n in flags})
    except ValueError as e:  # its message starts with the name of the setting at fault
        name = str(e).split()[0]
        raise ProjectError(re.sub(rf"\b{name}\b", f"--{prefix}{name}", str(e))) from None


def flags_of(cfg, prefix=""):
    """The settings of the dataclass `cfg` as flat flags {flag name: value}, lists for tuples (JSON)."""
    return {prefix + n: list(v) if isinstance(v := getattr(cfg, n), tuple) else v for n in setting_names(type(cfg))}


