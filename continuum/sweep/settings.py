"""A study's settings: :class:`SweepConfig`, and everything derived from its fields' metadata.

Each setting is declared once, as a field (here, or in :class:`~continuum.config.TrainConfig` /
:class:`~continuum.config.DataConfig`) with its flag, help, parser and role; the command line
(:func:`add_arguments`), experiment files (:func:`read_experiment`, :func:`from_settings`), validation
(:meth:`SweepConfig.validate`) and the grid's axes (:func:`axis_fields`) all come from those declarations.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from continuum.config import ConfigBase, DataConfig, TrainConfig, comma_items, flag_name, integer, learning_rate, \
    number, optional, parse_field, setting, text
from continuum.knobs import ORDERS, parse_bool, parse_kernel_size, parse_mid_act, parse_order, parse_segments

SEARCH_MODES = ("grid", "tpe", "nsga2")


class Objective(NamedTuple):
    """What a search can optimise: its direction and the results column it reads."""

    direction: str
    column: str


OBJECTIVES = {"val_acc": Objective("maximize", "val_acc"), "flops": Objective("minimize", "flops"),
              "latency": Objective("minimize", "latency_ms"), "params": Objective("minimize", "params")}
PRUNERS = ("none", "median", "hyperband")
LATER_AXES = ("depths", "kernel_sizes", "segment_widths", "lrs")
"""Axes added after studies had been run: at their defaults, they are left out of a search's stored choices (and,
see :data:`~continuum.sweep.points.KEYED_WHEN_SET`, of grid points' keys), so those studies still resume."""
LATER_SETTINGS = {("train", "precision"): "auto", ("data", "holdout"): 0, ("train", "warmup_epochs"): 0.0}
"""Settings added after studies had been run, and the value those studies ran with: at it, a setting is left out
of a study's fixed settings, so those studies still resume."""
NESTED = {"data": DataConfig, "train": TrainConfig}
"""Sub-configs of a :class:`SweepConfig`: their fields are settings too (``[data]`` / ``[train]`` in a file)."""


def study_name(value: Any) -> str:
    """A plain study name (it names a folder and goes into storage URLs): letters, digits, ``_``, ``-``, ``.``,
    not starting with a dot."""
    name = text(value)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name):
        raise ValueError(f"{value!r} is not valid; use a plain name of letters, digits, _, - and . ('spectrum')")
    return name


STORAGE_FIELDS = ("out", "study")
"""The settings a storage URL may name in braces (``journal:{out}/{study}/journal.log``)."""


def storage_text(value: Any) -> str:
    """A storage URL, in which ``{out}`` and ``{study}`` (:data:`STORAGE_FIELDS`) stand for those settings."""
    url = text(value)
    unknown = sorted(set(re.findall(r"\{([^{}]*)\}", url)) - set(STORAGE_FIELDS))
    if unknown:
        raise ValueError(f"{value!r} is not valid; {{{unknown[0]}}} names no setting: use {{out}} or {{study}}")
    return url


SEED_MAX = 2**32 - 1
"""The largest seed (NumPy's and torch's generators take 0 .. 2**32 - 1)."""


def seed(value: Any) -> int:
    """A seed: a whole number in ``0 .. 2**32 - 1``."""
    try:
        return integer(0, SEED_MAX)(value)
    except ValueError:
        raise ValueError(f"{value!r} is not valid; use whole numbers in 0..{SEED_MAX} such as 0,1,2") from None


def parse_depths(value: Any) -> Any:
    """Blocks per stage: ``2`` (every stage), ``1/2/1`` or ``[1, 2, 1]`` (one per stage), ``none`` (the model's)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        if isinstance(value, str) and "/" in value:
            return tuple(integer(1)(part.strip()) for part in value.split("/"))
        if isinstance(value, (list, tuple)):
            return tuple(integer(1)(part) for part in value)
        return integer(1)(value)
    except ValueError:
        raise ValueError(f"{value!r} is not valid; use a count >= 1 for every stage (2) or one per stage (1/2/1)") \
            from None


TUNED = "tuned"
"""The ``lr`` axis value that takes each point's learning rate from the ``lr_study`` (its best on validation)."""


def lr_choice(value: Any) -> float | str | None:
    """A learning rate: a number > 0, ``tuned`` (from the ``lr_study``), or ``none`` (the recipe's)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and value.strip().lower() == TUNED:
        return TUNED
    try:
        return learning_rate(value)
    except ValueError as err:
        shown = str(err).split(" is not valid")[0]  # the value as the number parser read it
        raise ValueError(f"{shown} is not valid; use learning rates > 0 (0.05,0.1), tuned, or none (the recipe's)") \
            from None


def grid_rates(cfg: SweepConfig) -> list[float]:
    """The numeric learning rates of ``cfg``'s grid, smallest first (without ``tuned`` or ``none``)."""
    return sorted(lr for lr in cfg.lrs if isinstance(lr, float))


def optional_count(value: Any) -> int | None:
    """A whole number >= 1, or ``none``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    return integer(1)(value)


@dataclass(frozen=True)
class SweepConfig(ConfigBase):
    """Everything ``python -m continuum.sweep`` runs: the axes of the grid or search, and the fixed settings.

    The axis fields are declared in the grid's loop order (outermost first). See each field's help in
    ``python -m continuum.sweep --help``; ``data`` and ``train`` hold the dataset and training settings.
    """

    models: tuple[str, ...] = setting(("continuum_small",), "timm model names", text, flag="model", axis="model",
                                      group="axes")
    widths: tuple[float, ...] = setting((1.0,), "width multipliers", number(0, low_open=True), flag="width",
                                        axis="width", group="axes", search=(0.5, 0.75, 1.0, 1.25, 1.5))
    depths: tuple[Any, ...] = setting((None,), "blocks per stage: N (every stage) or N/N/N (one per stage); none: "
                                               "the model's own", parse_depths, axis="depths", group="axes")
    residuals: tuple[bool, ...] = setting((True,), "shortcuts: on and/or off", parse_bool, flag="residual",
                                          axis="residual", group="axes", search=(True, False))
    mid_acts: tuple[Any, ...] = setting((None,), "intermediate activations: none, relu, elu, gelu, silu, ...",
                                        parse_mid_act, flag="mid-act", axis="mid_act", group="axes",
                                        search=(None, "relu", "elu"))
    orders: tuple[str, ...] = setting(("depthwise_first",), "operation orders", parse_order, choices=ORDERS,
                                      flag="order", axis="order", group="axes", search=ORDERS)
    kernel_sizes: tuple[int, ...] = setting((3,), "spatial kernel sizes, odd (7: ConvNeXt's depthwise convs)",
                                            parse_kernel_size, flag="kernel-size", axis="kernel_size", group="axes")
    segment_widths: tuple[Any, ...] = setting((None,), "channels per segment (RegNet's group width) instead of "
                                                       "--segments; none: use --segments", optional_count,
                                              flag="segment-width", axis="segment_width", group="axes")
    segments: tuple[Any, ...] = setting((1, 4, 16, "all"), "segment counts: ints and/or all", parse_segments,
                                        axis="segments", group="axes", search=(1, 2, 4, 8, 16, 32, "all"))
    lrs: tuple[Any, ...] = setting((None,), "initial learning rates; none: the recipe's; tuned: each point's best "
                                            "in --lr-study", lr_choice, flag="lr", axis="lr", group="training")
    seeds: tuple[int, ...] = setting((0,), "seeds; every point runs once per seed", seed, axis="seed", group="axes")
    lr_extend: bool = setting(False, "with several --lr: once each point's rates have all finished, where its best "
                                     "is the smallest or the largest, try one factor-2 step beyond it (once)",
                              parse_bool, switch=True)
    lr_study: str | None = setting(None, "with --lr tuned: the study (in the same results root) whose trials chose "
                                         "each point's learning rate, by mean validation accuracy",
                                   optional(study_name))
    retrain: str | None = setting(None, "a finished search (in the same results root): train again the "
                                        "configurations on its Pareto front in validation accuracy and FLOPs, best "
                                        "first, once per seed", optional(study_name))
    retrain_top: int = setting(3, "with --retrain: how many of the front's configurations", integer(1))
    drop_rate: float = setting(0.0, "dropout before the classifier", number(0, 1, high_open=True))
    match_params: int | None = setting(None, "scale each point's width to N parameters (within 2 %%)",
                                       optional(integer(1)))
    match_flops: int | None = setting(None, "scale each point's width to N FLOPs per image (within 2 %%)",
                                      optional(integer(1)))
    search: str = setting("grid", "grid, or a search (its trials never score a held-out test split: --retrain does)",
                         choices=SEARCH_MODES)
    n_trials: int = setting(20, "trials of a search (total in the study; a rerun tops it up)", integer(1))
    population: int | None = setting(None, "NSGA-II's trials per generation (its first is random); none: a quarter "
                                           "of --n-trials (2 to 50), about 4 generations", optional(integer(2)))
    objectives: tuple[str, ...] = setting(("val_acc",), "what a search optimises: val_acc first (nsga2 adds flops)",
                                          choices=tuple(OBJECTIVES), listed=True)
    pruner: str = setting("none", "prune weak trials early", choices=PRUNERS)
    study: str = setting("default", "study name; results go to OUT/STUDY/", study_name)
    storage: str | None = setting(None, "Optuna storage URL; {out} and {study} stand for --out and --study "
                                  "(default: sqlite:///OUT/STUDY/study.db)", optional(storage_text))
    out: str = setting("results", "results root; tables go to OUT/STUDY/", text)
    retry_failed: bool = setting(False, "rerun, once, points whose trial failed for a lasting reason", parse_bool,
                                 switch=True)
    heartbeat: int = setting(10, "seconds between trial heartbeats; 3 missed make a trial stale", integer(1))
    latency_batch: int = setting(32, "batch size of the per-trial latency probe", integer(1))
    workers: int = setting(1, "local worker processes sharing the study; one GPU each when several are visible, "
                              "else the CPU threads split between them", integer(1))
    trackers: tuple[str, ...] = setting((), "log every trial to: tensorboard, mlflow, module:Class (your own "
                                            "continuum.tracking.Tracker)", text, flag="tracker", listed=True)
    save_models: bool = setting(False, "store each trial's final weights in OUT/STUDY/models/ (results.load_model)",
                                parse_bool, switch=True)
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()

    def validate(self) -> SweepConfig:
        """Parse every setting (each axis item by its parser) and check how they combine, raising ``ValueError``
        naming the bad one."""
        values = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name in NESTED:
                values[field.name] = value.validate()
            elif field.metadata.get("listed"):
                items = tuple(value) if isinstance(value, (list, tuple)) else (value,)
                if not items and field.default:
                    raise ValueError(f"{flag_name(field)}: give at least one value")
                values[field.name] = parsed = tuple(parse_field(field, item) for item in items)
                twice = [item for i, item in enumerate(parsed) if item in parsed[:i]]
                if twice:
                    raise ValueError(f"{flag_name(field)}: {twice[0]} is listed twice; give each value once")
            else:
                values[field.name] = parse_field(field, value)
        cfg = dataclasses.replace(self, **values)
        if cfg.objectives[0] != "val_acc":
            raise ValueError(f"objectives={','.join(cfg.objectives)} is not valid; start with val_acc, then any of "
                             "flops, latency, params")
        if cfg.population is not None and cfg.search != "nsga2":
            raise ValueError(f"population={cfg.population} sizes NSGA-II's generations; give it with --search nsga2 "
                             "(or leave it out)")
        if cfg.population is not None and cfg.population >= cfg.n_trials:
            raise ValueError(f"population={cfg.population} with n_trials={cfg.n_trials}: NSGA-II would never get "
                             "past its first, random generation; give a population below n_trials (a quarter of it "
                             "makes 4 generations)")
        if len(cfg.objectives) > 1 and cfg.pruner != "none":
            raise ValueError("pruning needs a single objective; use --pruner none with several objectives")
        if cfg.match_params is not None and cfg.match_flops is not None:
            raise ValueError("match_params and match_flops both set the width; give one of them")
        if (cfg.match_params or cfg.match_flops) is not None and cfg.widths != (1.0,):
            raise ValueError(f"{'match_params' if cfg.match_params else 'match_flops'} needs no explicit widths "
                             "(it sets the width)")
        if TUNED in cfg.lrs and (cfg.lrs != (TUNED,) or cfg.lr_study is None or cfg.search != "grid"):
            raise ValueError("lr=tuned takes each grid point's learning rate from a finished study: give it alone, "
                             "with --lr-study NAME, in a grid")
        if cfg.lr_study is not None and cfg.lrs != (TUNED,):
            raise ValueError("lr_study is where --lr tuned reads the learning rates; give --lr tuned with it")
        if cfg.lr_study is not None and cfg.lr_study == cfg.study:
            raise ValueError(f"lr_study={cfg.lr_study} is this study; name the finished study that tried the rates")
        if cfg.retrain is not None:
            cfg.check_retrain()
        if len(cfg.lrs) > 1 and cfg.search != "grid":
            raise ValueError("several learning rates are a grid axis; a search trains with one (--lr 0.05)")
        if cfg.lr_extend and (len(grid_rates(cfg)) < 2 or cfg.search != "grid"):
            raise ValueError("lr_extend steps beyond the edges of a grid's learning rates; give two or more numbers "
                             "(--lr 0.025,0.05,0.1) in a grid")
        if cfg.segment_widths != (None,) and cfg.segments != ("all",):
            raise ValueError("segment_width and segments are two ways to size the segments; give one of them "
                             "(with segment_width, leave segments out)")
        return cfg

    @property
    def resolved_population(self) -> int:
        """NSGA-II's trials per generation: ``population``, or a quarter of ``n_trials`` from 2 to Optuna's default
        of 50 (which, over fewer than 100 trials, leaves NSGA-II a random search)."""
        return self.population or min(50, max(2, self.n_trials // 4))

    def check_retrain(self) -> None:
        """Refuse a ``retrain`` that cannot take its configurations from the search: in a search, of itself, or
        with architecture axes or width matching of its own."""
        if self.search != "grid":
            raise ValueError(f"retrain={self.retrain} trains a search's configurations again; use it in a grid "
                             "(--search grid)")
        if self.retrain == self.study:
            raise ValueError(f"retrain={self.retrain} is this study; name the finished search")
        given = [flag_name(f) for f in axis_fields() if f.metadata["axis"] not in ("lr", "seed")
                 and getattr(self, f.name) != f.default]
        given += [name for name in ("match_params", "match_flops") if getattr(self, name) is not None]
        if given:
            raise ValueError(f"retrain={self.retrain} takes the architectures from the search; leave out "
                             f"{', '.join(given)}")

    def fixed_settings(self) -> dict[str, Any]:
        """The settings every trial of a study must share (a rerun with other values would mix results).

        Where and how fast a worker runs (device, compile, memory format, data folder) is not among them, nor are
        settings added later while at the value studies before them ran with (:data:`LATER_SETTINGS`); a single
        learning rate is (several are a grid axis, and part of each point); a search's choices are, since they are
        stored with its trials and cannot change.
        """
        train = {k: v for k, v in self.train.to_dict().items() if k not in ("device", "compile", "channels_last")}
        train["lr"] = self.lrs[0]
        if len(self.lrs) > 1:
            del train["lr"]
        data = {k: v for k, v in self.data.to_dict().items() if k != "data_dir"}
        settings = {
            "data": {k: v for k, v in data.items() if LATER_SETTINGS.get(("data", k), ...) != v},
            "train": {k: v for k, v in train.items() if LATER_SETTINGS.get(("train", k), ...) != v},
            "objectives": list(self.objectives), "search": self.search, "drop_rate": self.drop_rate,
            "match_params": self.match_params, "match_flops": self.match_flops}
        if self.lr_study is not None:
            settings["lr_study"] = self.lr_study
        if self.retrain is not None:
            settings |= {"retrain": self.retrain, "retrain_top": self.retrain_top}
        if self.search != "grid":  # axes at their defaults that studies did not always have are left out
            settings["choices"] = {f.name: [str(v) for v in getattr(self, f.name)] for f in axis_fields()
                                   if not (f.name in LATER_AXES and getattr(self, f.name) == f.default)}
        return settings

    def to_json(self) -> str:
        """The validated config as JSON (how a worker process receives it)."""
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SweepConfig:
        """Build and validate from a dict of settings (see :func:`from_settings`)."""
        return from_settings(data)

    @classmethod
    def from_json(cls, payload: str) -> SweepConfig:
        """The config :meth:`to_json` wrote."""
        return from_settings(json.loads(payload))


def setting_fields() -> Iterator[tuple[str | None, dataclasses.Field]]:
    """Every setting as ``(sub-config name or None, field)``: the study's own, then ``data`` and ``train``."""
    for field in fields(SweepConfig):
        if field.name in NESTED:
            yield from ((field.name, sub) for sub in fields(NESTED[field.name]) if sub.metadata)
        else:
            yield None, field


def axis_fields() -> list[dataclasses.Field]:
    """The grid's axes, in loop order (outermost first)."""
    return [f for f in fields(SweepConfig) if f.metadata.get("axis")]


def from_settings(settings: dict[str, Any]) -> SweepConfig:
    """A validated :class:`SweepConfig` from settings named as on the command line or as fields (``order`` or
    ``orders``, ``batch_size`` or ``batch-size``), flat or nested under ``data`` / ``train``; ``None`` values are
    left at their defaults; a comma text gives an axis several values. In a search, axes left out take their
    ``search`` defaults, and NSGA-II optimises FLOPs too unless told otherwise.

    Raises:
        ValueError: an unknown setting or a bad value, naming it.
    """
    names = {}
    for part, field in setting_fields():
        for name in {field.name, flag_name(field).replace("-", "_")}:
            names[name] = (part, field)
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if key in NESTED and isinstance(value, dict):
            flat |= {f"{key}.{k}": v for k, v in value.items()}
        elif key in NESTED:
            raise ValueError(f"{key}={value!r} is not valid; [{key}] is a table of settings ({key}.NAME = VALUE)")
        elif isinstance(value, dict) and key.replace("-", "_") in names:
            raise ValueError(f"[{key}] is not valid; {key} is a value, not a table (tables: "
                             f"{', '.join(f'[{part}]' for part in NESTED)})")
        elif isinstance(value, dict):  # an unknown table: its keys are reported below
            flat |= {f"{key}.{k}": v for k, v in value.items()}
        else:
            flat[key] = value
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {part: {} for part in NESTED}
    unknown = []
    for key, value in flat.items():
        part, _, name = key.rpartition(".")
        name = name.replace("-", "_")
        training = name in names and names[name][1].metadata["group"] == "training"
        if name not in names or (part and names[name][0] != part and not (part == "train" and training)):
            unknown.append(key)  # (a study-level training setting, the lr axis, may sit under [train] too)
            continue
        owner, field = names[name]
        if value is None:
            continue
        if field.metadata.get("listed") and isinstance(value, str):
            value = tuple(comma_items(key, value))
        (nested[owner] if owner else top)[field.name] = value
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; python -m continuum.sweep --help lists the known ones")
    if "segment_widths" in top and "segments" not in top:
        top["segments"] = ("all",)  # unused: the segment widths size the segments
    if top.get("search", "grid") != "grid":
        for field in axis_fields():
            if field.metadata["search"]:
                top.setdefault(field.name, field.metadata["search"])
        if str(top["search"]).lower() == "nsga2":
            top.setdefault("objectives", ("val_acc", "flops"))
    return SweepConfig(**top, **{part: NESTED[part](**values) for part, values in nested.items()}).validate()


def read_experiment(path: Path) -> dict[str, Any]:
    """Settings from a TOML experiment file: the command-line names (``segments``, ``order``, ``epochs``, ...) or
    the field names, flat or under ``[data]`` / ``[train]`` tables.

    Raises:
        ValueError: the file is missing, unreadable or not valid TOML.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"--config {path}: cannot read it ({type(err).__name__}: {err})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"--config {path}: not valid TOML ({err})") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One option per setting, in its group, with its help, choices and default. Every option's default is
    ``None``, so that an experiment file's values are not overridden."""
    titles = {"axes": "axes (comma lists)", "data": "data", "training": "training", "study": "study"}
    groups = {key: parser.add_argument_group(title) for key, title in titles.items()}
    for _, field in setting_fields():
        meta = field.metadata
        default = field.default if meta["listed"] else (field.default,)
        shown = ",".join("none" if v is None else ("on" if v else "off") if isinstance(v, bool) else str(v)
                         for v in default) or "none"
        choices = f": {', '.join(meta['choices'])}" if meta["choices"] else ""
        default_text = "" if "(default:" in meta["help"] else f" (default: {shown})"
        option = "--" + flag_name(field).replace("_", "-")
        if meta["switch"]:
            groups[meta["group"]].add_argument(option, dest=field.name, action="store_const", const=True,
                                               help=meta["help"])
        else:
            groups[meta["group"]].add_argument(option, dest=field.name, metavar="LIST" if meta["listed"] else "VALUE",
                                               help=f"{meta['help']}{choices}{default_text}")
