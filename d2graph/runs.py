"""Training runs: the resolved config, the run folder, checkpoints, metrics, resume.

In:  a checked `Graph` with a `train { }` block, `--set` overrides, an output folder.
Out: `train(...)` runs the block's stages in order on one compiled executor and returns a
     `Trained` (executor, policy, data, validation and test reports). A run folder
     (`runs/<graph>/<timestamp>/`, or `--out`) holds:
        <graph>.d2        a copy of the source (`d2graph train` on it reproduces the run)
        config.json       the resolved config: data set, settings, stages, every default filled
                          (`threads`: the count the run used)
        metrics.jsonl     one JSON object per logged row (and metrics.csv, the same rows)
        last.pt, best.pt  checkpoints: state dicts and plain data, loaded with weights_only=True;
                          best.pt is the best epoch of the last stage that validates (each such
                          stage rewrites it), and says which (`best_of`, `describe_best`)
        report.json/.txt  the final evaluation on validation and test
        graph.svg         the graph drawn with each node's execution rate (if `dot` is installed)
        graph.dot         the same drawing as DOT text (always written, `dot` or not)
        training.png/.svg each stage's training loss and validation score per epoch (redrawn as
                          each stage ends; a stage fitted once is one point)
        .d2graph.lock     only while a process creates or trains the run (`RunLock`)
Guarantees:
  - Every file is written atomically; a crash or Ctrl-C never leaves half a file. Ctrl-C
    stops at the next step boundary, writes `last.pt` there and raises `Interrupted`;
    `train(..., resume=True)` continues from it exactly (same steps, same random numbers).
    The same boundary gets a `last.pt` every `checkpoint_every` steps and after
    `checkpoint_seconds`, so a run killed outright loses little; its resume removes the
    temporary files the killed writer left.
  - One process at a time: claiming a folder (`Run.create`) and training in it hold an
    flock'd lock file, so two runs given one --out cannot both find it free (E922).
  - What is read back is checked: a run's config.json with the train block's schemas (E922;
    settings newer than the run take their defaults), and a checkpoint's network fingerprint
    against the source's (E922; checkpoints from before fingerprints pass).
  - A NaN or infinite loss, weight or metric stops the run (E925) before it is saved or
    logged: last.pt keeps the last good state and metrics.jsonl stays strict JSON.
  - Determinism: the initial weights, each epoch's order of examples and each step's random
    numbers (dropout, exploration) derive from (seed, stage, epoch, step) alone, so the same
    seed and thread count on the same machine give the same metrics, resumed or not. A run
    computes on the config's `threads` (`auto` is fixed to a count by `resolve`, so config.json
    records the count used), and torch's own count is restored when `train` returns.
  - Under torchrun (`group`, d2graph.distributed) every process trains on its share of each
    batch and the step is the global batch's; process 0 alone writes the run folder, and
    the others take its checkpoint on `--resume` (docs/scaling.md).
  - Mistakes in overrides (E920), a trainer that does not suit the graph (E921), a missing,
    corrupt, foreign or busy run folder or checkpoint (E922), a file without a train block
    (E923) and a diverged run (E925) are `D2GraphError`s with a message and a hint.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

try:
    import fcntl  # POSIX: a lock the kernel drops when its process dies, however it dies
except ImportError:  # Windows
    fcntl = None

from . import data as data_module
from .diagnostics import D2GraphError, Diagnostic, did_you_mean
from .distributed import Group
from .executor import Executor, compile
from .files import FILE_MODE, atomic_path, remove_stale_temporaries, write_atomic
from .ir import Graph
from .layers import initialise
from .plots import training_plot
from .schema import DATASETS, TRAIN_SETTINGS, TRAINERS, Symbol
from .paths import path_costs
from .policies import LearnedPolicy, Policy, StaticPolicy, load_policy, save_policy
from .threads import thread_count, using_threads

__all__ = ["LOCK_FILE", "SWEEP_FILE", "Config", "Interrupted", "Run", "RunLock", "Stage", "Trained",
           "check_fingerprint", "computing_in", "config_error", "derive_seed", "describe_best", "graph_fingerprint",
           "holdout_fraction", "refuse_sweep", "resolve", "stage_problems", "sweep_folder", "train",
           "validate_config"]

CHECKPOINT_FORMAT = 1
# Settings whose default changes what a run computes, with the value that reproduces a run
# folder written before they existed (its resume must see the same data). Not `threads`: such
# a run used torch's default, one thread per CPU of the machine it ran on, which no value
# recorded now can say; it takes `auto`, which at most changes the last digits of its metrics.
BEFORE_SETTING = {"holdout": 0.0}
SWEEP_FILE = "sweep.json"  # marks a folder `d2graph sweep` made (and each of its seeds' folders)
LOCK_FILE = ".d2graph.lock"  # held (and there) while a process creates or trains a run in the folder


def config_error(code: str, message: str, help: str = "") -> D2GraphError:
    """A mistake in a train block, an override, a run folder or a checkpoint (E920–E923), or
    a run that diverged (E925)."""
    return D2GraphError([Diagnostic(code, message, None, "", help=help)])


def graph_fingerprint(graph: Graph) -> str:
    """A hash of the network that a checkpoint's weights and policy belong to: the checked
    IR's text (`str(graph)`: each node's kind, inputs, controllers, actions, shape and layers)
    without the train block, which can change without changing the network.

    Example:
        >>> graph_fingerprint(d2graph.load("examples/high_low.d2"))        # doctest: +SKIP
        '3f0c9a1d2b7e4f60'
    """
    text = str(dataclasses.replace(graph, train=None))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def check_fingerprint(state: dict[str, Any], graph: Graph, path: str | Path, help: str) -> None:
    """E922 when the checkpoint `state` (read from `path`) was trained on another version of
    `graph`: one whose weights may well load (same names and shapes) but that routes
    differently, e.g. with a control node's actions swapped. Checkpoints written before
    checkpoints carried a fingerprint pass."""
    saved = state.get("fingerprint")
    if saved is not None and saved != graph_fingerprint(graph):
        raise config_error("E922", f"{path} was trained on another version of graph `{graph.name}`: the source "
                                   f"changed after the run (network fingerprint {saved}, the source's is "
                                   f"{graph_fingerprint(graph)})", help=help)


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving `last.pt`; `run` is the folder to resume."""

    def __init__(self, run: Run | None):
        super().__init__("interrupted")
        self.run = run


# --- the resolved config --------------------------------------------------------------------


def _plain(value: Any) -> Any:
    """IR values → JSON values (tuples → lists, symbols → strings)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Symbol):
        return str(value)
    return value


@dataclass
class Config:
    """A train block with every default filled in, plus the overrides: what a run did."""

    graph: str
    data: dict[str, Any]  # {"name": ..., "args": {...}}
    settings: dict[str, Any]
    stages: list[dict[str, Any]]  # [{"name", "trainer", "params": {...}}]
    # The folder relative data paths (`npz("data.npz")`) are read from: the .d2 file's, kept so
    # that `eval` and `--resume`, which read the source copy in the run folder, find the data.
    data_root: str | None = None

    def data_folder(self, source: str | Path) -> Path:
        """Where relative data paths are read from: `data_root` when the run recorded one, else
        the folder of `source` (the .d2 file, or the run folder's copy of it)."""
        return Path(self.data_root) if self.data_root else Path(source).resolve().parent

    def to_json(self) -> dict[str, Any]:
        out = {"graph": self.graph, "data": self.data, "settings": self.settings, "stages": self.stages}
        return out if self.data_root is None else {**out, "data_root": self.data_root}

    @classmethod
    def from_json(cls, d: Any, where: str = "config.json") -> Config:
        """A config as `to_json` wrote it, checked with the schemas of a train block (E922 for
        each problem, naming `where`): a run's config.json may have been edited by hand.
        Settings added to d2graph after the run was made take their defaults.

        Example:
            >>> Config.from_json({"graph": "g", "data": {"name": "digits", "args": {}},
            ...                   "settings": {"batch": 0}, "stages": []}).settings  # doctest: +SKIP
            D2GraphError: error[E922]: config.json: `settings.batch` must be a positive integer, not 0
        """
        return validate_config(d, where)

    def text(self) -> str:
        return json.dumps(self.to_json(), indent=2) + "\n"

    def stage(self, name: str) -> dict[str, Any]:
        for s in self.stages:
            if s["name"] == name:
                return s
        raise KeyError(name)


NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # a graph's or a stage's name, as the grammar's NAME


def validate_config(raw: Any, where: str) -> Config:
    """`raw` (parsed JSON) checked as a resolved config: the graph's name (which names the
    source copy, so it must stay inside the run folder), the data set and its arguments, the
    settings and each stage's trainer and parameters, with the same schemas that check a
    train block and `--set`. Raises one D2GraphError with an E922 per problem."""
    problems: list[str] = []

    def bound(schema, args: dict[str, Any], key: str) -> dict[str, Any]:
        out, diags = schema.bind([], [(k, v, None, None) for k, v in args.items()], None,
                                 "data set" if key == "data" else "trainer")
        problems.extend(f"`{key}`: {d.message}" for d in diags if d.is_error)
        return {k: _plain(v) for k, v in out.items()}

    if not isinstance(raw, dict):
        problems.append("is not a JSON object")
        raw = {}
    graph = raw.get("graph")
    if not isinstance(graph, str) or not NAME.fullmatch(graph):
        problems.append(f"`graph` must be the graph's name (its source copy is NAME.d2 in the run folder), "
                        f"not {json.dumps(graph)}")
    data, settings, stages = raw.get("data"), raw.get("settings"), raw.get("stages")
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or not isinstance(data.get("args"), dict):
        problems.append(f'`data` must be {{"name": DATA SET, "args": {{...}}}}, not {json.dumps(data)}')
    elif data["name"] not in DATASETS:
        problems.append(f"`data`: unknown data set `{data['name']}`{did_you_mean(data['name'], DATASETS.names())}")
    else:
        data = {"name": data["name"], "args": bound(DATASETS.get(data["name"]).schema, data["args"], "data")}
    resolved: dict[str, Any] = {}
    if not isinstance(settings, dict):
        problems.append(f"`settings` must be an object of settings, not {json.dumps(settings)}")
        settings = {}
    for key in settings:
        if key not in settings_names():
            problems.append(f"no setting `settings.{key}`{did_you_mean(key, settings_names())}")
    for param in TRAIN_SETTINGS.params:
        # A setting newer than the run takes its default, or the value that reproduces what
        # the run did before it existed.
        value = settings.get(param.name, BEFORE_SETTING.get(param.name, _plain(param.default)))
        if not param.accepts(value):
            problems.append(f"`settings.{param.name}` must be {param.describe()}, not {json.dumps(value)}")
        resolved[param.name] = _plain(param.coerce(value))
    checked: list[dict[str, Any]] = []
    if not isinstance(stages, list):
        problems.append(f"`stages` must be a list of stages, not {json.dumps(stages)}")
        stages = []
    for i, stage in enumerate(stages):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str) or \
                not NAME.fullmatch(stage["name"]) or not isinstance(stage.get("params"), dict):
            problems.append(f'`stages[{i}]` must be {{"name": NAME, "trainer": TRAINER, "params": {{...}}}}')
            continue
        trainer = stage.get("trainer")
        if not isinstance(trainer, str) or trainer not in TRAINERS:
            problems.append(f"`stages[{i}].trainer`: unknown trainer {json.dumps(trainer)}"
                            f"{did_you_mean(str(trainer), TRAINERS.names())}")
            continue
        checked.append({"name": stage["name"], "trainer": trainer,
                        "params": bound(TRAINERS.get(trainer).schema, stage["params"], f"stages[{i}].params")})
    data_root = raw.get("data_root")
    if data_root is not None and not isinstance(data_root, str):
        problems.append(f"`data_root` must be a folder's path, not {json.dumps(data_root)}")
    if problems:
        help = ("config.json is written by `d2graph train`: undo the edit, or start a new run with the change as "
                "`--set KEY=VALUE` (another --out)")
        raise D2GraphError([Diagnostic("E922", f"{where}: {problem}", None, "", help=help if i == len(problems) - 1
                                       else "") for i, problem in enumerate(problems)])
    return Config(graph, data, resolved, checked, data_root)


def resolve(graph: Graph, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """The train block of `graph` as a Config, with `overrides` ("key=value") applied."""
    block = graph.train
    if block is None:
        raise config_error("E923", f"graph `{graph.name}` has no `train` block, so there is nothing to run",
                           help="add one inside the graph, e.g.\n  train {\n"
                                "    data = cluttered_digits(size=32)\n    stage backbone = supervised(epochs=5)\n"
                                "    stage policy = threshold(budget=0.5)\n  }")
    if block.data is None:
        raise config_error("E923", f"the train block of `{graph.name}` names no data set",
                           help="add `data = digits`, `data = cluttered_digits(size=32)` or `data = npz(path=\"...\")`")
    settings = {p.name: _plain(p.default) for p in TRAIN_SETTINGS.params}
    settings.update({k: _plain(v) for k, v in block.settings})
    config = Config(graph.name, {"name": block.data[0], "args": {k: _plain(v) for k, v in block.data[1]}},
                    settings, [{"name": s.name, "trainer": s.trainer, "params": {k: _plain(v) for k, v in s.args}}
                               for s in block.stages])
    for text in overrides:
        apply_override(config, text)
    # `auto` depends on the machine and its environment, so the count is fixed here: config.json
    # records the count the run used, and its resume and `eval` use it again.
    config.settings["threads"] = thread_count(config.settings["threads"])
    return config


def parse_value(text: str) -> Any:
    """A value as written on the command line: 3, 0.5, true, "text", word, [1, 2]."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1].strip()
        return [parse_value(part) for part in inner.split(",")] if inner else []
    if text in ("true", "false"):
        return text == "true"
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _bind(schema, args: dict[str, Any], what: str, key: str) -> dict[str, Any]:
    bound, diags = schema.bind([], [(k, v, None, None) for k, v in args.items()], None, what)
    errors = [d for d in diags if d.severity == "error"]
    if errors:
        raise D2GraphError([Diagnostic("E920", f"--set {key}: {errors[0].message}", None, "", help=errors[0].help)])
    return {k: _plain(v) for k, v in bound.items()}


def apply_override(config: Config, text: str) -> None:
    """Apply one `--set key=value`: `seed=3`, `data.n=2000`, `data=digits`,
    `stage.policy.budget=0.3` (or `policy.budget=0.3`). Raises E920 on a mistake."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise config_error("E920", f"--set {text!r} is not `key=value`",
                           help="e.g. `--set seed=3`, `--set data.n=2000`, `--set stage.policy.budget=0.3`")
    value = parse_value(raw)
    parts = key.split(".")
    if parts[0] == "stage":
        parts = parts[1:]
    stage_names = [s["name"] for s in config.stages]
    if len(parts) == 1 and parts[0] in settings_names():
        param = TRAIN_SETTINGS.params[settings_names().index(parts[0])]
        if not param.accepts(value):
            raise config_error("E920", f"--set {key}: `{key}` must be {param.describe()}", help=param.doc)
        config.settings[key] = _plain(param.coerce(value))
    elif parts == ["data"]:
        if not isinstance(value, str) or value not in DATASETS:
            raise config_error("E920", f"--set data: unknown data set {value!r}"
                                       f"{did_you_mean(str(value), DATASETS.names())}",
                               help="data sets: " + ", ".join(DATASETS.names()))
        config.data = {"name": value, "args": _bind(DATASETS.get(value).schema, {}, "data set", key)}
    elif len(parts) == 2 and parts[0] == "data":
        spec = DATASETS.get(config.data["name"])
        config.data["args"] = _bind(spec.schema, {**config.data["args"], parts[1]: value}, "data set", key)
    elif len(parts) == 2 and parts[0] in stage_names:
        stage = config.stage(parts[0])
        trainer = TRAINERS.get(stage["trainer"])
        stage["params"] = _bind(trainer.schema, {**stage["params"], parts[1]: value}, "trainer", key)
    else:
        known = settings_names() + ["data"] + [f"data.{k}" for k in config.data["args"]] + \
            [f"stage.{s['name']}.{p}" for s in config.stages for p in s["params"]]
        raise config_error("E920", f"--set: no setting `{key}`{did_you_mean(key, known)}",
                           help="settable: " + ", ".join(f"`{k}`" for k in known))


def settings_names() -> list[str]:
    return [p.name for p in TRAIN_SETTINGS.params]


# --- the run folder -------------------------------------------------------------------------


def sweep_folder(folder: str | Path) -> Path | None:
    """The sweep folder that `folder` belongs to: `folder` itself when `d2graph sweep` made it,
    its parent when it is one seed's folder (`seed-S/`) of a sweep; None otherwise. A sweep is
    known by its `sweep.json` (or, made before that file existed, by its `curve.csv`).

    Example:
        >>> sweep_folder("runs/early_exit/sweep-20261130-120000/seed-1")      # doctest: +SKIP
        PosixPath('runs/early_exit/sweep-20261130-120000')
    """
    folder = Path(folder)
    candidates = [folder, folder.parent] if folder.name.startswith("seed-") else [folder]
    for f in candidates:
        if (f / SWEEP_FILE).is_file() or (f / "curve.csv").is_file():
            return f
    return None


def refuse_sweep(folder: str | Path, doing: str) -> None:
    """E922 when `folder` is (in) a sweep folder: `doing` (e.g. "--resume") would turn it into a run."""
    owner = sweep_folder(folder)
    if owner is None:
        return
    what = "a sweep folder" if Path(folder) == owner else f"one seed's folder of the sweep {owner}"
    raise config_error("E922", f"{folder} is {what} (`d2graph sweep` made it), not a run folder: "
                               f"{doing} would rewrite it into a run",
                       help="a sweep cannot be continued or trained into; run the sweep again with another `--out`, "
                            "or train one policy into a run folder of its own: `d2graph train FILE --out RUN`")


class RunLock:
    """A claim on a run folder: the lock file `.d2graph.lock` in it, locked with `flock` (the
    kernel drops the lock when its process dies, however it dies) and removed on `release`.
    A second process, or a second claim in this one, is refused (E922) while it is held.

    Example:
        >>> lock = RunLock.acquire(Path("runs/g/1")); ...; lock.release()  # doctest: +SKIP
    """

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        path = Path(folder) / LOCK_FILE
        while True:
            try:
                flags = os.O_RDWR | os.O_CREAT | (os.O_EXCL if fcntl is None else 0)
                fd = os.open(path, flags, FILE_MODE)
            except FileExistsError:  # no flock: an existing file is a claim (maybe a killed one's)
                raise cls._busy(folder, path, "") from None
            if fcntl is None:
                break
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                raise cls._busy(folder, path, holder) from None
            # The holder we raced with may have released (and removed) the file between our
            # open and our flock: then our lock is on a file no one else will open; try again.
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        return cls(path, fd)

    @staticmethod
    def _busy(folder: Path, path: Path, holder: str) -> D2GraphError:
        who = f" (process {holder})" if holder.isdigit() else ""
        stale = "" if fcntl is not None else f"; if no d2graph process runs there, delete {path}"
        return config_error("E922", f"{folder} is in use: another d2graph process{who} is training in it",
                            help=f"wait for it to finish, or choose another --out{stale}")

    def release(self) -> None:
        if self._fd is None:
            return
        # Removed while still held, so that a process waiting on it sees the file change.
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None

    def __del__(self):  # a Run dropped without training still frees its folder
        try:
            self.release()
        except Exception:  # at interpreter exit `os` may be gone; the kernel frees the lock anyway
            pass


class Run:
    """A run folder. `Run.create` makes a new one; `Run.open` reads an existing one."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._rows: list[dict[str, Any]] | None = None
        self.restarted = False  # `create` reused a folder whose run never reached a checkpoint
        self.lock: RunLock | None = None  # held from `create`, or by `train`, until training ends

    @classmethod
    def create(cls, graph: Graph, source: str, config: Config, out: str | Path | None = None, *,
               sweep: dict[str, Any] | None = None) -> Run:
        """A new run folder (`out`, or `runs/<graph>/<timestamp>/`). `sweep` (plain data about the
        sweep) makes it a sweep's folder: it gets a `sweep.json`, which `train --resume` and
        `train --out` refuse (E922) and `render --stats` explains."""
        folder = Path(out) if out is not None else Path("runs") / graph.name
        try:
            if out is None:
                # mkdir is the claim: of two runs started in the same second, one gets `-2`.
                base = Path("runs") / graph.name / time.strftime("%Y%m%d-%H%M%S")
                base.parent.mkdir(parents=True, exist_ok=True)
                folder, i = base, 1
                while True:
                    try:
                        folder.mkdir()
                        break
                    except FileExistsError:
                        i += 1
                        folder = base.with_name(f"{base.name}-{i}")
            else:
                if sweep is None:
                    refuse_sweep(folder, "--out")
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise config_error("E922", f"cannot create the run folder {folder}: {e.strerror}",
                               help="choose another folder with --out") from None
        # Whether the folder already holds a run is decided under the lock, so two processes
        # given one --out cannot both find it free.
        lock = RunLock.acquire(folder)
        try:
            run = cls._create(graph, source, config, folder, lock, sweep)
        except BaseException:
            lock.release()
            raise
        return run

    @classmethod
    def _create(cls, graph: Graph, source: str, config: Config, folder: Path, lock: RunLock,
                sweep: dict[str, Any] | None) -> Run:
        restarted = False
        if (folder / "config.json").exists():
            if any(folder.glob("*.pt")) and sweep is not None:
                raise config_error("E922", f"{folder} already holds a sweep",
                                   help="a sweep cannot be continued; choose another --out")
            if any(folder.glob("*.pt")):
                raise config_error("E922", f"{folder} already holds a run",
                                   help=f"continue it with `d2graph train --resume {folder}`, "
                                        "or choose another --out")
            # No checkpoint: the run stopped before training did (a graph that did not fit its
            # data, a trainer that refused it). There is nothing to resume; start over in it.
            cls._clear(folder, graph.name)
            restarted = True
        remove_stale_temporaries(folder)  # of a process killed in this folder before
        run = cls(folder)
        run.lock = lock
        run.restarted = restarted
        write_atomic(folder / f"{graph.name}.d2", source)
        write_atomic(folder / "config.json", config.text())
        if sweep is not None:
            write_atomic(folder / SWEEP_FILE, json.dumps(sweep, indent=2) + "\n")
        run._rows = []
        return run

    @staticmethod
    def _clear(folder: Path, name: str) -> None:
        """Remove what a run that never reached a checkpoint left in `folder`: its config, metrics
        and source copy (under its own graph name, which may not be `name`)."""
        try:
            old = json.loads((folder / "config.json").read_text()).get("graph")
        except (OSError, ValueError, AttributeError):
            old = None
        stale = ["config.json", "metrics.jsonl", "metrics.csv"]
        if isinstance(old, str) and old.isidentifier() and old != name:
            stale.append(f"{old}.d2")
        for file in stale:
            (folder / file).unlink(missing_ok=True)

    @classmethod
    def open(cls, folder: str | Path) -> Run:
        folder = Path(folder)
        if not folder.is_dir():
            raise config_error("E922", f"no run folder {folder}", help="give a folder that `d2graph train` created")
        if not (folder / "config.json").is_file():
            raise config_error("E922", f"{folder} is not a run folder (it has no config.json)",
                               help="give a folder that `d2graph train` created, e.g. runs/<graph>/<timestamp>")
        return cls(folder)

    # --- contents ---

    @property
    def config(self) -> Config:
        """The run's config.json, checked (`Config.from_json`): every command that reads a run
        folder (`train --resume`, `eval`, `render --stats`, `policy export`) reads it here."""
        try:
            raw = json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise config_error("E922", f"{self.folder / 'config.json'} is unreadable or damaged ({e})",
                               help="the run cannot be resumed; start a new one") from None
        return Config.from_json(raw, str(self.folder / "config.json"))

    @property
    def source(self) -> Path:
        name = self.config.graph  # a plain name (checked): the copy cannot lie outside the run folder
        path = self.folder / f"{name}.d2"
        if not path.is_file() or path.is_symlink():
            raise config_error("E922", f"{self.folder} has no copy of the source ({path.name})",
                               help="the run cannot be resumed; start a new one")
        return path

    def rows(self) -> list[dict[str, Any]]:
        if self._rows is None:
            path = self.folder / "metrics.jsonl"
            self._rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
                if path.exists() else []
        return self._rows

    def log(self, row: dict[str, Any]) -> None:
        """Append a metrics row (JSONL and CSV are rewritten whole, atomically: they are small).
        A NaN or an infinity is refused (E925): JSON has no such numbers."""
        bad = [k for k, v in row.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            where = f" in stage `{row['stage']}`" if "stage" in row else ""
            raise config_error("E925", f"training diverged: `{bad[0]}` is {row[bad[0]]}{where}; the run stops "
                                       "without logging it",
                               help="a learning rate too high for the network is the usual cause: start again with a "
                                    "lower one (`--set lr=...`) in another --out, or check the data")
        rows = self.rows()
        rows.append(row)
        self._write_rows()

    def truncate(self, n: int) -> None:
        """Forget the rows after the first `n` (those logged after the checkpoint resumed from)."""
        if len(self.rows()) > n:
            del self.rows()[n:]
            self._write_rows()

    def _write_rows(self) -> None:
        rows = self.rows()
        write_atomic(self.folder / "metrics.jsonl", "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
        columns: list[str] = []
        for r in rows:
            columns += [k for k in r if k not in columns]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.folder / "metrics.csv", buf.getvalue())

    def save(self, name: str, state: dict[str, Any]) -> None:
        with atomic_path(self.folder / f"{name}.pt") as tmp:
            torch.save(state, tmp)

    def load(self, name: str = "last", *, help: str | None = None) -> dict[str, Any]:
        return load_checkpoint(self.folder / f"{name}.pt", help=help)


def load_checkpoint(path: str | Path, *, help: str | None = None) -> dict[str, Any]:
    """A checkpoint written by `Run.save`, loaded with `weights_only=True`; E922 if it is
    missing, damaged or not ours. `help` says what the caller's user can do instead (default:
    name what a d2graph checkpoint is)."""
    path = Path(path)
    if not path.is_file():
        raise config_error("E922", f"no checkpoint {path}",
                           help="a run writes last.pt after its first epoch or stage; best.pt when a stage validates")
    damaged = config_error("E922", f"{path} is not a d2graph checkpoint, or it is damaged (truncated or overwritten)",
                           help=help or "give a checkpoint that `d2graph train` wrote (a run's last.pt or best.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many kinds, with long texts about its own internals, for a damaged file
        raise damaged from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT or "weights" not in state:
        raise damaged
    return state


def describe_best(state: dict[str, Any], config: Config) -> str:
    """What a best.pt holds, in a sentence for `eval --checkpoint best`: which stage and
    epoch, its validation score, and the stages of `config` that came after it (and so are
    not in it). '' for a checkpoint that is not a best.pt.

    Example:
        >>> describe_best(run.load("best"), run.config)                      # doctest: +SKIP
        'best.pt holds stage `backbone` at epoch 2 (validation score 0.9125), ...'
    """
    best = state.get("best_of")
    if not isinstance(best, dict):
        return ""
    text = (f"best.pt holds stage `{best['stage']}` at epoch {best['epoch']} (validation score {best['score']:.4g}), "
            "the best epoch of the run's last stage that validates")
    later = [s["name"] for s in config.stages[int(best["stage_index"]) + 1:]]
    if later:
        text += (f"; the stage{'s' if len(later) > 1 else ''} after it ("
                 + ", ".join(f"`{name}`" for name in later) + ") "
                 + ("are" if len(later) > 1 else "is") + " not in it, so it routes with the policy it had then; "
                 "`--checkpoint last` is the run's final model")
    return text


# --- a stage of a run -----------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across runs and machines (no Python hash()).

    Example:
        >>> derive_seed(0, -1) == derive_seed(0, -1) != derive_seed(1, -1)
        True
    """
    h = 1469598103934665603
    for p in parts:
        for byte in int(p).to_bytes(8, "little", signed=True):
            h = ((h ^ byte) * 1099511628211) % (1 << 64)
    return h % (1 << 63)


def _key(part: Any) -> int:
    if isinstance(part, int):
        return part
    return derive_seed(*str(part).encode())


class _StopFlag:
    """Ctrl-C sets it; training stops at the next step boundary. A second Ctrl-C interrupts
    at once (Python's default handler is back)."""

    def __init__(self):
        self.set = False

    @contextmanager
    def installed(self) -> Iterator[None]:
        try:
            previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C is not ours to handle
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def _handle(self, signum, frame) -> None:
        self.set = True
        signal.signal(signal.SIGINT, signal.default_int_handler)


class _Stop(Exception):
    pass


AUGMENT_STREAM = 0xA6  # the key of the augmentation's random numbers among a step's streams


class Stage:
    """What a trainer gets to run one stage: settings, an optimiser, epochs and batches that
    resume where an interrupted run stopped, deterministic random numbers, the metrics log.

    Attributes: name, index, trainer, seed, batch, device, policy (the policy before this
    stage), extra (a dict a trainer may fill with plain data or tensors to checkpoint)."""

    def __init__(self, session: _Session, index: int, name: str, trainer: str, resume: dict[str, Any] | None):
        self.session = session
        self.index, self.name, self.trainer = index, name, trainer
        s = session.config.settings
        self.seed, self.batch = int(s["seed"]), int(s["batch"])
        self.device = session.device
        self.group = session.group
        self.policy = session.policy
        self.epoch, self.steps_done = 0, 0
        self.step_rows = 0  # the current step's examples over every process (its global batch)
        self._rows_here = 0  # ... and this process's share of them
        self._resume = resume  # the checkpoint this stage continues from, if any
        self.extra: dict[str, Any] = dict(resume.get("extra", {})) if resume else {}
        self._loss = list(resume.get("train_loss", [0.0, 0])) if resume else [0.0, 0]
        self.best = resume.get("best_score") if resume else None
        self._optimizer: torch.optim.Optimizer | None = None

    # --- for trainers ---

    def optimizer(self, params) -> torch.optim.Optimizer:
        """The train block's optimiser over `params` (its state restored on resume)."""
        s = self.session.config.settings
        params = list(params)
        kind, lr, wd = s["optimizer"], float(s["lr"]), float(s["weight_decay"])
        if kind == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
        elif kind == "adamw":
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        elif kind == "adam":
            opt = torch.optim.Adam(params, lr=lr, weight_decay=wd)
        else:  # the schema admits no other; a new choice must be added here, not run as Adam
            raise ValueError(f"optimizer {kind!r} has no implementation")
        if self._resume is not None and self._resume.get("optimizer") is not None:
            opt.load_state_dict(self._resume["optimizer"])
        if self.group.world > 1:  # a step is the global batch's step on every process
            opt.register_step_pre_hook(lambda o, args, kwargs: self.group.sync_gradients(
                [p for g in o.param_groups for p in g["params"]], self._rows_here))
            opt.register_step_post_hook(lambda o, args, kwargs: self.group.copy_buffers(self.session.executor))
        self._optimizer = opt
        return opt

    def epochs(self, n: int) -> Iterator[int]:
        """Epoch numbers 0..n-1, starting where a resumed run stopped."""
        start = int(self._resume.get("epoch", 0)) if self._resume else 0
        for epoch in range(start, n):
            self.epoch = epoch
            yield epoch
        self.epoch = n

    def batches(self, dataset, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Shuffled batches of `dataset` for `epoch`, on the stage's device; resumes mid-epoch.
        Before each step the global torch seed is set from (seed, stage, epoch, step). A
        training split with augmentation (`data.AugmentedDataset`) has each batch changed by
        it, with its own generator seeded from (seed, stage, epoch, step), so a rerun or a
        resumed run sees the same images. Under torchrun each process takes its share of
        every global batch of `batch` examples (`Group.shard`); a trainer must then call its
        optimiser's `step()` on every step, on every process (the gradients are summed there)."""
        x_all, y_all = dataset.tensors
        augmentation = dataset.augmentation if isinstance(dataset, data_module.AugmentedDataset) else None
        n = len(y_all)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(self.seed, self.index, epoch)))
        steps = math.ceil(n / self.batch)
        start = 0
        if self._resume is not None and int(self._resume.get("epoch", 0)) == epoch:
            start = int(self._resume.get("step", 0))
            self._resume = {**self._resume, "step": 0}  # only the first resumed epoch skips steps
        if start == 0:
            self._loss = [0.0, 0]
        self.steps_done = start
        bar = self.session.progress(steps, start, f"{self.name} epoch {epoch + 1}")
        try:
            for step in range(start, steps):
                if self.session.stopping():
                    raise _Stop
                if step > start and self.session.checkpoint_due(step):
                    self.session.checkpoint(self, epoch=epoch, step=step)
                torch.manual_seed(derive_seed(self.seed, self.index, epoch, step, *self._rank_key()))
                idx = order[step * self.batch:(step + 1) * self.batch]
                self.step_rows = len(idx)
                x = x_all[idx]
                if augmentation is not None:  # on the global batch: each image is changed as in one process
                    x = augmentation(x, torch.Generator().manual_seed(
                        derive_seed(self.seed, self.index, epoch, step, AUGMENT_STREAM)))
                here = self.group.shard(len(idx))
                self._rows_here = here.stop - here.start
                yield self._to_device(x[here]), self._to_device(y_all[idx[here]])
                self.steps_done = step + 1
                if bar is not None:
                    bar.update(1)
                    if self._loss[1]:
                        bar.set_postfix(loss=f"{self._loss[0] / self._loss[1]:.4f}", refresh=False)
        finally:
            if bar is not None:
                bar.close()

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # from pinned memory the copy overlaps the GPU's work
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def step(self, loss: float, n: int) -> None:
        """Record a training step's mean loss over its `n` examples (for the epoch's log line).
        A NaN or infinite loss stops the run (E925): from there on every weight it reaches is
        NaN, and the run would train to chance and log NaN. Under torchrun the loss is the
        global batch's, and a Ctrl-C that reached one process stops every one at this step."""
        if self.group.world > 1:
            total, n, stop = self.group.sum([loss * n, n, self.session.stop.set])
            loss, n = total / max(n, 1), int(n)
            self.session.stop_agreed = stop > 0
        if not math.isfinite(loss):
            raise self.session.diverged(f"stage `{self.name}` has a training loss of {loss} at epoch "
                                        f"{self.epoch + 1}, step {self.steps_done + 1}")
        self._loss[0] += loss * n
        self._loss[1] += n

    def generator(self, *key: Any, shared: bool = False) -> torch.Generator:
        """A generator seeded from (seed, stage, epoch, step, *key): the same numbers on a rerun.
        Under torchrun each process draws other numbers (for other examples), unless `shared`
        (to draw something of the global batch, the same on every process)."""
        rank = () if shared else self._rank_key()
        return torch.Generator(device=self.device).manual_seed(
            derive_seed(self.seed, self.index, self.epoch, self.steps_done, *(_key(k) for k in key), *rank))

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This process's rows of `t`, a tensor over a global batch (all of it in one process)."""
        return t[self.group.shard(len(t))]

    def sums(self, values) -> list[float]:
        """Each of `values` (numbers) summed over the processes: the statistics of a global
        batch (a mean reward, a cost for a dual step) that every process must agree on."""
        return self.group.sum(values)

    def _rank_key(self) -> tuple[int, ...]:
        # Nothing in one process, so its random numbers are those of runs before torchrun.
        return (0xD15, self.group.rank) if self.group.world > 1 else ()

    def log(self, **metrics: Any) -> None:
        """Record a row of metrics for this stage."""
        self.session.log({"stage": self.name, "trainer": self.trainer, **metrics})

    def end_epoch(self, score: float, **metrics: Any) -> None:
        """Log the epoch, save `last.pt`, and `best.pt` when `score` (higher is better) improved."""
        loss = self._loss[0] / self._loss[1] if self._loss[1] else None
        row = {"epoch": self.epoch + 1, "train_loss": None if loss is None else round(loss, 6),
               "val_score": round(score, 6), **metrics}
        self.log(**row)
        self.session.echo(f"{self.name} epoch {self.epoch + 1}: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()
            if k != "epoch" and v is not None))
        # `best` is per stage: a later stage that validates starts afresh, so its first epoch
        # replaces the earlier stage's best.pt and the run's best.pt is always from its last
        # validating stage (the stage whose epochs the final model came out of).
        improved = self.best is None or score > self.best
        if improved:
            self.best = score
        self.steps_done = 0
        self.session.checkpoint(self, epoch=self.epoch + 1, step=0, best=improved)

    def state(self, epoch: int, step: int) -> dict[str, Any]:
        return {"stage_index": self.index, "epoch": epoch, "step": step, "extra": self.extra,
                "optimizer": self._optimizer.state_dict() if self._optimizer is not None else None,
                "train_loss": list(self._loss), "best_score": self.best}


# --- training -------------------------------------------------------------------------------


@dataclass
class Trained:
    """What `train` produced."""

    executor: Executor
    policy: Policy
    data: Any  # d2graph.data.Splits
    config: Config
    run: Run | None
    reports: dict[str, Any] = field(default_factory=dict)  # split → d2graph.evaluate.Report
    # split → Report of the full network (the dearest static path) on that split, the number a
    # user compares the policy's with first; empty for a graph without control nodes.
    full: dict[str, Any] = field(default_factory=dict)
    full_path: str = ""  # which static path that is, e.g. "Q1=2 Q2=2"


class _Session:
    def __init__(self, config: Config, run: Run | None, device: torch.device, quiet: bool, echo, group: Group):
        self.config, self.run, self.device, self.quiet = config, run, device, quiet
        self.group = group
        self.stop_agreed = False  # under torchrun: whether any process had a Ctrl-C at the last step
        self._echo = echo
        self.stop = _StopFlag()
        self.policy: Policy = LearnedPolicy()
        self.executor: Executor | None = None
        self._in_memory_rows: list[dict[str, Any]] = []
        self._fingerprint: str | None = None
        self.saved_at = time.monotonic()  # when last.pt was last written (or training began)
        self.saved = ""  # what last.pt holds, for a diverged run's message

    def stopping(self, agree: bool = False) -> bool:
        """Whether to stop at this step boundary. In one process: after a Ctrl-C. Under
        torchrun every process must stop at the same step, so it is what the processes agreed
        at the last step's sum (`Stage.step`), or with `agree`, what they agree now."""
        if self.group.world == 1:
            return self.stop.set
        if agree:
            self.stop_agreed = self.group.sum([self.stop.set])[0] > 0
        return self.stop_agreed

    def checkpoint_due(self, step: int) -> bool:
        """Whether a stage should save last.pt before step `step` of an epoch (not the first it
        runs): every `checkpoint_every` steps, or when `checkpoint_seconds` passed since the
        last save. The step boundary is the one Ctrl-C stops at, so a resume is just as exact."""
        every = int(self.config.settings.get("checkpoint_every", 0))
        seconds = int(self.config.settings.get("checkpoint_seconds", 0))
        return bool(every and step % every == 0) or bool(seconds and time.monotonic() - self.saved_at >= seconds)

    def diverged(self, what: str) -> D2GraphError:
        """E925: training produced a NaN or an infinity (`what`); nothing of it is saved."""
        lr = self.config.settings.get("lr")
        lr = f"{lr:g}" if isinstance(lr, (int, float)) else lr
        kept = "" if self.run is None else f"; {self.run.folder / 'last.pt'} holds the last good state ({self.saved})" \
            if self.saved else "; no checkpoint was written before"
        return config_error("E925", f"training diverged: {what}; the run stops without saving it",
                            help=f"a learning rate too high for the network is the usual cause: start again with a "
                                 f"lower one (`--set lr=...`; it is {lr}) in another --out, or check the data{kept}")

    def echo(self, text: str) -> None:
        if not self.quiet and self._echo is not None:
            self._echo(text)

    def progress(self, total: int, initial: int, desc: str):
        """A tqdm bar when stderr is a terminal (and not quiet); None otherwise."""
        if self.quiet or not sys.stderr.isatty():
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True)

    def log(self, row: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(row)
        else:
            self._in_memory_rows.append(row)

    def plot_training(self) -> None:
        """Redraw the run's training.png/.svg (each stage's loss and validation score per epoch)."""
        if self.run is None:
            return
        try:
            training_plot(self.run.rows(), self.run.folder / "training", title=f"{self.config.graph}: training")
        except ImportError as e:  # plots.py imports matplotlib on first use
            self.echo(f"note: {e}; the run folder gets no training.png")

    def rows_logged(self) -> int:
        return len(self.run.rows()) if self.run is not None else len(self._in_memory_rows)

    def checkpoint(self, stage: Stage | None, epoch: int = 0, step: int = 0, best: bool = False,
                   stage_index: int | None = None, complete: bool = False) -> None:
        if self.run is None:
            return
        weights = self.executor.state_dict()
        for name, value in weights.items():  # never replace the last good checkpoint with NaN weights
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                where = stage.name if stage is not None else self.config.stages[stage_index - 1]["name"]
                raise self.diverged(f"the weights `{name}` hold a NaN or an infinity in stage `{where}`")
        if self._fingerprint is None:
            self._fingerprint = graph_fingerprint(self.executor.graph)
        state = {"format": CHECKPOINT_FORMAT, "graph": self.config.graph, "fingerprint": self._fingerprint,
                 "weights": weights, "policy": save_policy(self.policy),
                 "metrics_rows": self.rows_logged(), "complete": complete}
        if stage is not None:
            state.update(stage.state(epoch, step))
        else:
            state.update({"stage_index": stage_index, "epoch": 0, "step": 0, "extra": {}, "optimizer": None,
                          "train_loss": [0.0, 0], "best_score": None})
        self.run.save("last", state)
        self.saved_at = time.monotonic()
        self.saved = (f"stage `{stage.name}` at epoch {epoch + 1}, step {step}" if stage is not None and step
                      else f"stage `{stage.name}` after epoch {epoch}" if stage is not None
                      else f"the end of stage `{self.config.stages[stage_index - 1]['name']}`")
        if best and stage is not None:
            self.run.save("best", {**state, "best_of": {"stage": stage.name, "stage_index": stage.index,
                                                        "epoch": epoch, "score": stage.best}})


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise config_error("E920", "the train block asks for device = cuda, but torch sees no CUDA device",
                           help="use `device = auto` (CUDA when there is one, else the CPU) or `--set device=cpu`")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_data(config: Config, graph: Graph, root: str | Path | None):
    """The config's data set, checked against the graph's input and output shapes."""
    # The example shape first, from the arguments or the file's headers: a graph that does not
    # fit is told so before a large data set is built.
    data_module.check_fits(graph, config.data["name"], root=root, **config.data["args"])
    splits = data_module.load(config.data["name"], seed=int(config.settings["seed"]), root=root,
                              **config.data["args"])
    data_module.check_compatible(splits, graph)
    fraction = holdout_fraction(config)
    if fraction > 0:
        splits = splits.hold_out(fraction, derive_seed(int(config.settings["seed"]), -3))
    return splits


def holdout_fraction(config: Config) -> float:
    """The train block's `holdout`: as written, or for `auto` the largest share a stage's
    trainer asks for (`Trainer.holdout`)."""
    value = config.settings.get("holdout", BEFORE_SETTING["holdout"])
    if value == "auto":
        return max((getattr(TRAINERS.get(s["trainer"]), "holdout", 0.0) for s in config.stages), default=0.0)
    return float(value)


def make_trainers(config: Config, graph: Graph) -> list:
    """Each stage's trainer, built from its parameters and checked against `graph`; raises
    the first problem (E921 and the trainers' own codes)."""
    return [_make_trainer(s, graph) for s in config.stages]


def _make_trainer(stage: Mapping[str, Any], graph: Graph):
    cls = TRAINERS.get(stage["trainer"])
    if cls is None:
        raise config_error("E921", f"unknown trainer `{stage['trainer']}`"
                                   f"{did_you_mean(stage['trainer'], TRAINERS.names())}",
                           help="trainers: " + ", ".join(TRAINERS.names()))
    trainer = cls(**stage["params"])
    trainer.check_graph(graph)
    return trainer


def stage_problems(graph: Graph) -> list[Diagnostic]:
    """What each stage's trainer finds wrong with `graph` (e.g. `threshold` where a control
    node decides before any classifier runs), every stage checked, each problem pointing at
    its `stage` line: `d2graph check` and the language server report them with the
    checker's own. Empty without a train block or data (the checker reports those)."""
    if graph.train is None or graph.train.data is None:
        return []
    def located(e: D2GraphError, span) -> list[Diagnostic]:
        return [d if d.span is not None else dataclasses.replace(d, span=span) for d in e.diagnostics]

    try:
        config = resolve(graph)
    except D2GraphError as e:  # reported, not raised: the caller keeps the checker's findings
        return located(e, graph.train.span)
    problems: list[Diagnostic] = []
    for stage, declared in zip(config.stages, graph.train.stages):
        try:
            _make_trainer(stage, graph)
        except D2GraphError as e:
            problems += located(e, declared.span)
    return problems


def train(graph: Graph, config: Config, run: Run | None = None, *, resume: bool = False, root=None,
          quiet: bool = False, echo=print, evaluate: bool = True, stages: slice | None = None,
          start: Trained | None = None, group: Group | None = None) -> Trained:
    """Run the stages of `config` on `graph` (a fresh executor, or `start`'s), logging to
    `run`, on the config's `threads` (torch's count is restored afterwards). `resume=True`
    continues from `run/last.pt`. `stages` limits the stages run (the sweep trains the
    backbone once, then each policy stage). Raises `Interrupted` on Ctrl-C (after saving
    `last.pt`) and D2GraphError on mistakes in the config, data or run.

    `group` (d2graph.distributed) is the processes of a torchrun job: each trains on its
    share of every batch; only process 0 is given the `run` (the others pass None, and
    `resume=True` has them take process 0's checkpoint)."""
    group = group or Group()
    if resume and run is not None:
        refuse_sweep(run.folder, "--resume")
    if run is not None and run.lock is None:  # `Run.create` took it already; a resume takes it here
        run.lock = RunLock.acquire(run.folder)
    try:
        if resume and run is not None:
            remove_stale_temporaries(run.folder)  # of the process that was killed, if it was
        with using_threads(thread_count(config.settings.get("threads", "auto"))):
            return _train(graph, config, run, resume=resume, root=root, quiet=quiet, echo=echo, evaluate=evaluate,
                          stages=stages, start=start, group=group)
    finally:
        if run is not None and run.lock is not None:
            run.lock.release()
            run.lock = None


def _train(graph: Graph, config: Config, run: Run | None, *, resume: bool, root, quiet: bool, echo,
           evaluate: bool, stages: slice | None, start: Trained | None, group: Group) -> Trained:
    device = pick_device(config.settings["device"])
    # The resume state first (process 0 reads it for all): the data may be what stopped the run.
    resume_state = group.from_main(lambda: _resume_state(run, graph)) if resume else None
    seed = int(config.settings["seed"])
    trainers = make_trainers(config, graph)
    splits = start.data if start is not None else load_data(config, graph, root)
    session = _Session(config, run, device, quiet, echo, group)
    if splits.holdout is not None and start is None:  # say that the function nodes see fewer examples
        session.echo(f"data: {splits.describe()}; the held-out ones only teach the policy stages (`holdout`)")
    if start is not None:
        executor, session.policy = start.executor, start.policy
    else:
        torch.manual_seed(derive_seed(seed, -1))  # initial weights: a function of the seed only
        executor = compile(graph)
        initialise(executor, config.settings["init"])
    executor.to(device)
    if config.settings.get("compile") and start is None:
        executor.compile_nodes()
    session.executor = executor
    first = 0
    if resume_state is not None:
        try:
            executor.load_state_dict(resume_state["weights"])
            session.policy = load_policy(graph, resume_state["policy"])
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            where = run.folder if run is not None else "the run folder"
            raise config_error("E922", f"{where}/last.pt does not fit graph `{graph.name}` ({str(e)[:200]})",
                               help="the source or the checkpoint was changed after the run; start a new run") from None
        if run is not None:
            run.truncate(int(resume_state.get("metrics_rows", len(run.rows()))))
        first = int(resume_state.get("stage_index", 0))
    indices = range(len(config.stages))[stages] if stages is not None else range(len(config.stages))
    with session.stop.installed(), computing_in(config, device):
        for i in indices:
            if i < first:
                continue
            spec = config.stages[i]
            stage = Stage(session, i, spec["name"], spec["trainer"], resume_state if i == first else None)
            # Booleans as the language writes them, so the line can be pasted into a file.
            session.echo(f"stage {spec['name']} = {spec['trainer']}(" + ", ".join(
                f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in spec["params"].items()) + ")")
            try:
                policy = trainers[i].fit(executor, splits, stage)
            except _Stop:
                session.checkpoint(stage, epoch=stage.epoch, step=stage.steps_done)
                raise Interrupted(run) from None
            if policy is not None:
                session.policy = policy
                session.echo(f"  policy: {policy.describe()}")
            session.checkpoint(None, stage_index=i + 1, complete=i + 1 == len(config.stages))
            session.plot_training()
            if session.stopping(agree=True):
                raise Interrupted(run)
    trained = Trained(executor, session.policy, splits, config, run)
    if not group.main:  # process 0 evaluates and reports
        return trained
    if evaluate:
        with computing_in(config, device):
            finish(trained, quiet=quiet, echo=echo)
    return trained


def computing_in(config: Config, device: torch.device):
    """The context the run computes in: with `precision = bf16`, torch.autocast to bfloat16
    on `device` (convolutions and matrix products; losses and softmaxes stay float32, and so
    do the weights); with `fp32`, nothing changes."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=config.settings.get("precision") == "bf16")


def _resume_state(run: Run, graph: Graph) -> dict[str, Any]:
    """What `--resume` continues from: run/last.pt, checked to belong to `graph`."""
    if not any(run.folder.glob("*.pt")):
        raise config_error("E922", f"{run.folder} has no checkpoint: the run stopped before training started",
                           help="there is nothing to resume; start it again with `d2graph train FILE --out "
                                f"{run.folder}`, which reuses the folder")
    best = f"; its best.pt may be intact: `d2graph eval {run.folder} --checkpoint best`" \
        if (run.folder / "best.pt").is_file() else ""
    state = run.load("last", help="--resume continues only from last.pt, so this run cannot be "
                                  "continued: start it again with the command that made it and another "
                                  f"--out{best}")
    if state.get("graph") != graph.name:
        raise config_error("E922", f"{run.folder}/last.pt belongs to graph `{state.get('graph')}`, "
                           f"not `{graph.name}`", help="resume a run of this graph")
    check_fingerprint(state, graph, run.folder / "last.pt",
                      help=f"put the run's copy of the source ({run.folder / (graph.name + '.d2')}) back as it "
                           "was, or train the edited file into a new run")
    return state


def report_text(trained: Trained) -> str:
    """report.txt: the policy (once), the policy's accuracy and cost next to the full
    network's per split, then each split's table (`Report.table`)."""
    lines = [f"policy: {trained.policy.describe()}"]
    full = trained.full
    if full:
        test = full["test"]
        every = "every node runs" if test.cost_fraction >= 1 else "the dearest static path; no path runs every node"
        lines.append(f"full network: path {trained.full_path} ({every}; {test.cost_fraction:.1%} of the full graph's "
                     "cost)")
    rows = [("split", "examples", "policy accuracy", "policy cost", *(("full network accuracy",) if full else ()))]
    for split, r in trained.reports.items():
        rows.append((split, f"{r.n:,}", f"{r.accuracy:.1%}", f"{r.cost_fraction:.1%}",
                     *((f"{full[split].accuracy:.1%}",) if full else ())))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines.append("")
    lines += ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
              for row in rows]
    return "\n".join(lines) + "\n\n" + "\n\n".join(r.table(routed_by=False) for r in trained.reports.values()) + "\n"


def finish(trained: Trained, *, quiet: bool = False, echo=print) -> None:
    """Evaluate on validation and test; write report.json / report.txt and graph.dot / graph.svg."""
    from .evaluate import evaluate

    seed = int(trained.config.settings["seed"])
    batch = max(int(trained.config.settings["batch"]), 256)
    for split in ("val", "test"):
        generator = torch.Generator().manual_seed(derive_seed(seed, -2))  # random policies: reproducible
        trained.reports[split] = evaluate(trained.executor, trained.data[split], trained.policy,
                                          classes=trained.data.classes, batch=batch, generator=generator,
                                          split=split)
    graph = trained.executor.graph
    if graph.control_nodes:
        actions, _, _ = path_costs(graph)[0]  # dearest first
        trained.full_path = " ".join(f"{q}={a + 1}" for q, a in actions.items())
        for split in ("val", "test"):
            trained.full[split] = evaluate(trained.executor, trained.data[split], StaticPolicy(actions),
                                           classes=trained.data.classes, batch=batch, split=split)
    run = trained.run
    if run is None:
        return
    report = {"policy": trained.policy.describe(), **{s: r.to_json() for s, r in trained.reports.items()}}
    if trained.full:
        report["full_network"] = {"path": trained.full_path, **{
            s: {k: getattr(r, k) for k in ("accuracy", "f1", "mean_cost", "cost_fraction")}
            for s, r in trained.full.items()}}
    write_atomic(run.folder / "report.json", json.dumps(report, indent=2) + "\n")
    write_atomic(run.folder / "report.txt", report_text(trained))
    try:
        from .render import render

        render(trained.executor.graph, run.folder / "graph.svg", trained.reports["test"])
    except D2GraphError:
        pass  # no `dot`: graph.dot is still written; the report says the rest
