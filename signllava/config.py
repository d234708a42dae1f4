"""Run configuration files: `--config FILE.yaml` (or `.json`) gives flag values, the command line overrides them.

Keys are the flags' names without the dashes (`learning_rate`, `no_packing`) or their destinations as the run
records them (`packing: false`). Every run writes the flags it ran with to OUTPUT_DIR/args.yaml, in that
second form, so `--config OUTPUT_DIR/args.yaml` runs it again. A key no flag knows, a value of the wrong type
or outside a flag's choices, or null for a flag that has a default or is required, is argparse's one-line usage
error (exit status 2) naming the file and the key (and the closest flag, or the flag an original Sign LLaVA key
became). A file in the original's layout (sections
ModelArguments, TrainingArguments, ...) is read through signllava/migrate_config.py.
"""
from __future__ import annotations

import argparse
import difflib
import json
import sys
from pathlib import Path

import yaml

from signllava.atomic import write_atomic
from signllava.errors import brief
from signllava.migrate_config import MigrationError, is_original_layout, migrate, original_key_hint

NOT_RECORDED = ("config", "local_rank")          # how the run was started, not what it does


def add_config_arg(p: argparse.ArgumentParser):
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of flag values (keys: the flags' names, e.g. learning_rate: 2.0e-4); "
                        "flags given on the command line win. Each run writes OUTPUT_DIR/args.yaml, which --config "
                        "takes back to repeat the run")


def parse_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """p.parse_args, with the --config file's values as the defaults the command line overrides."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        values = read_config(p, Path(known.config))
        p.set_defaults(**values)
        for action in p._actions:
            if action.dest in values:
                action.required = False          # given by the file; the command line may still override it
    return p.parse_args(argv)


def _actions(p: argparse.ArgumentParser) -> tuple[dict, dict]:
    """(destination -> action, flag name without dashes -> action) of every flag but --help and --config."""
    actions = [a for a in p._actions if a.option_strings and a.dest not in ("help", "config")]
    return {a.dest: a for a in actions}, {s.lstrip("-"): a for a in actions for s in a.option_strings}


# A run's flags fit in a few kilobytes. Both caps keep a hostile file cheap: YAML aliases let 421 bytes stand for
# hundreds of millions of values, which cost nothing until something (an error message) walks them.
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 10_000                  # values after aliases are expanded (keys, items, scalars)
MAX_CONFIG_CHARS = 4 << 20                  # characters of all strings after aliases are expanded


def _within_size(data) -> bool:
    """Whether `data` expands to at most MAX_CONFIG_VALUES values and MAX_CONFIG_CHARS characters; stops counting
    at the first value over, so a structure of shared references costs no more than the caps to measure."""
    stack, values, chars = [data], 0, 0
    while stack:
        x = stack.pop()
        values += 1
        chars += len(x) if isinstance(x, str) else 0
        if values > MAX_CONFIG_VALUES or chars > MAX_CONFIG_CHARS:
            return False
        if isinstance(x, dict):
            stack.extend(x.keys())
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return True


def _name(key) -> str:
    """A key as a message names it: as written when it is short text, else cut."""
    return key if isinstance(key, str) and len(key) <= 40 and key.isprintable() else brief(key, 40)


def read_config(p: argparse.ArgumentParser, path: Path) -> dict:
    """The file's values by destination, converted and checked as argparse would check them."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
        if len(raw) > MAX_CONFIG_BYTES:
            p.error(f"--config {path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a file of flag values")
        text = raw.decode("utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError, RecursionError) as e:
        p.error(f"--config {path}: cannot read it ({(str(e).splitlines() or [type(e).__name__])[0][:200]})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        p.error(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    if not _within_size(data):
        p.error(f"--config {path}: expands to more than {MAX_CONFIG_VALUES:,} values or {MAX_CONFIG_CHARS >> 20} M "
                f"characters (YAML anchors and aliases?); a file of flag values is far smaller")
    by_dest, by_flag = _actions(p)
    if is_original_layout(data):
        data = _from_original(p, path, data, by_dest, by_flag)
    unknown = [k for k in data if k not in by_dest and k not in by_flag]
    if unknown:
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        p.error(f"--config {path}: unknown key(s) "
                + ", ".join(f"{_name(k)}{_hint(str(k)[:200], by_flag)}" for k in unknown[:5]) + more
                + f" (not flags of {p.prog})")
    values, problems = {}, []
    for key, value in data.items():
        action = by_dest.get(key) or by_flag[key]
        try:
            values[action.dest] = _value(action, key, value, as_dest=key in by_dest)
        except ValueError as e:
            problems.append(f"{_name(key)}: {e}")
    if problems:
        p.error(f"--config {path}: " + "; ".join(problems))
    return values


def _hint(key: str, by_flag: dict) -> str:
    """What an unknown key probably meant: the flag an original Sign LLaVA key became, else the closest flag."""
    original = original_key_hint(key)
    if original is not None:
        return f" (the original's name; here: {original}; python -m signllava.migrate_config converts a whole file)"
    match = difflib.get_close_matches(key, list(by_flag), n=1, cutoff=0.6)
    return f" (closest flag: {match[0]})" if match else ""


def _from_original(p: argparse.ArgumentParser, path: Path, data: dict, by_dest: dict, by_flag: dict) -> dict:
    """A file in the original Sign LLaVA's layout, translated as `python -m signllava.migrate_config` does."""
    try:
        m = migrate(data, str(path))
    except MigrationError as e:
        p.error(f"--config {e}")
    foreign = [k for k in m.values if k not in by_dest and k not in by_flag]
    if foreign:
        p.error(f"--config {path}: the original's config for {m.script} (it sets {', '.join(foreign)}, which "
                f"{p.prog} has no flag for); run {m.script}")
    print(f"note: --config {path}: the original Sign LLaVA's layout, read as `python -m signllava.migrate_config "
          f"{path}` converts it ({len(m.values)} flags; {len(m.dropped)} keys dropped and {len(m.notes)} "
          "differences, which that command lists)", file=sys.stderr)
    return m.values


def _value(action: argparse.Action, key: str, value, as_dest: bool):
    if action.nargs == 0:                        # store_true / store_false
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {brief(value)}")
        flips = isinstance(action, argparse._StoreFalseAction) and not as_dest
        return not value if flips else value
    if value is None:
        # None is a value only of a flag that is off until given (default None, not required), as args.yaml
        # records it; anywhere else it would reach the run as a number or name it is not.
        if action.default is None and not action.required:
            return None
        raise ValueError(f"cannot be null (leave the key out for its default, {brief(action.default)})"
                         if action.default is not None else "cannot be null (the flag is required)")
    if isinstance(value, (dict, list, bool)):
        raise ValueError(f"expected a single value, got {brief(value)}")
    if action.type is not None:
        try:
            value = action.type(str(value))
        except (TypeError, ValueError, argparse.ArgumentTypeError):
            raise ValueError(f"not a valid {getattr(action.type, '__name__', 'value')}: {brief(value)}") from None
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{brief(value)} is not one of {', '.join(map(str, action.choices))}")
    return value


def write_run_args(args: argparse.Namespace, path: Path):
    """OUTPUT_DIR/args.yaml: every flag's value in this run, readable back through --config."""
    record = {k: v for k, v in vars(args).items() if k not in NOT_RECORDED}
    write_atomic(path, yaml.safe_dump(record, sort_keys=False, default_flow_style=False))
