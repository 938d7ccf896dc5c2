"""``shopmtl.train``: a config trained into an output folder. One path for the Python API and
the ``shopmtl train`` command (which prints the metrics ``run_training`` returns); the same
checks of the config and of the output folder in both.

    import shopmtl
    model = shopmtl.train("examples/census.yaml", "runs/census")   # a shopmtl.Model
    model = shopmtl.train({"data": {"synthetic": {"rows": 50000}}}, "runs/s", overwrite=True)
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shopmtl.modeldir import Model

ConfigLike = str | Path | Mapping[str, Any]


@dataclass(frozen=True)
class TrainResult:
    kind: str  # "zoo" (one table) or "joint" (a config with ``sources``)
    out: Path
    model_dir: Path  # what ``shopmtl.load`` reads: OUT/model, or OUT/joint/model
    metrics: dict[str, Any]  # metrics.json's content; {} on a torchrun rank other than 0


def run_training(config: ConfigLike, out: str | Path, *, overrides: Sequence[str] = (),
                 resume: bool = False, overwrite: bool = False, baselines: bool = False,
                 alone: bool = False, progress: bool = False,
                 log: Callable[..., Any] = print) -> TrainResult:
    """Train ``config`` (a YAML path or a dict shaped like one, zoo or joint) into ``out``.

    ``out`` is locked for the whole run (``train.outlock``). It must be empty, unless
    ``resume`` (continue the run in it from its latest checkpoint) or ``overwrite`` (replace
    a previous shopmtl run's folder; any other folder is refused): ``train.outdir``. The
    config is checked before anything in ``out`` is replaced. ``baselines``: also single-task
    models (zoo); ``alone``: also each source alone (joint)."""
    from shopmtl.checks import load_run_config
    from shopmtl.config import to_dict
    from shopmtl.joint.config import JointConfig
    from shopmtl.train.checkpoint import CheckpointError
    from shopmtl.train.distributed import env_world
    from shopmtl.train.outdir import (
        OutputFolderError,
        check_flags,
        check_output,
        inputs_inside,
        start_run,
    )
    from shopmtl.train.outlock import locked_output

    out = Path(out)
    check_flags(resume, overwrite)
    rank = env_world()[0]
    main = rank == 0
    # under torchrun rank 0 alone writes OUT, so it alone holds the lock and prepares OUT
    with locked_output(out) if main else contextlib.nullcontext():
        action = check_output(out, resume=resume, overwrite=overwrite) if main else None
        cfg = load_run_config(config, overrides)
        joint = isinstance(cfg, JointConfig)
        checkpoints = out / "joint" / "checkpoints" if joint else out / "checkpoints"
        if resume and not (checkpoints / "latest").is_file():
            raise CheckpointError(f"--resume: no checkpoint in {checkpoints}")
        run_id = None
        if main and action is not None:
            keep = _kept(cfg)
            if action == "overwrite" and (found := inputs_inside(to_dict(cfg), out, keep)):
                raise OutputFolderError(f"--overwrite would delete {found[0]}, which the config "
                                        f"reads: move it out of {out} or choose another --out")
            run_id = start_run(out, action, keep=keep, checkpoints=checkpoints)
        if joint:
            from shopmtl.joint.report import run_joint

            metrics = run_joint(cfg, out, alone=alone, resume=resume, log=log, run_id=run_id)
            return TrainResult("joint", out, out / "joint" / "model", metrics)
        from shopmtl.run import run_experiment

        metrics = run_experiment(cfg, out, baselines=baselines, resume=resume,
                                 progress=progress, log=log, run_id=run_id)
        return TrainResult("zoo", out, out / "model", metrics)


def _kept(cfg: Any) -> tuple[str, ...]:
    """What replacing a folder keeps for this config: the synthetic world generated in it,
    which a ``data.synthetic`` run reuses when it is the same world (else regenerates)."""
    from shopmtl.run import SYNTHETIC_DATA

    synthetic = getattr(getattr(cfg, "data", None), "synthetic", None) is not None
    return (SYNTHETIC_DATA,) if synthetic else ()


def train(config: ConfigLike, out: str | Path, *, overrides: Sequence[str] = (),
          resume: bool = False, overwrite: bool = False, baselines: bool = False,
          alone: bool = False, progress: bool = False,
          log: Callable[..., Any] | None = None) -> Model:
    """Train as ``shopmtl train CONFIG --out OUT`` does (``run_training``: the same checks,
    the same files in ``out``) and return the trained model, ``shopmtl.load`` of its model
    directory (``OUT/model``, or ``OUT/joint/model`` for a joint config).

    ``overrides``: ``--set`` strings, ``"train.epochs=2"``. ``resume`` / ``overwrite``: a
    non-empty ``out`` is continued / replaced (only a previous shopmtl run's folder); without
    either it is refused (``train.outdir.OutputFolderError``). ``log``: where the run's
    progress lines go (default: standard error, so a caller's standard output stays its own)."""
    from shopmtl.modeldir import load

    if log is None:
        log = functools.partial(print, file=sys.stderr)
    result = run_training(config, out, overrides=overrides, resume=resume, overwrite=overwrite,
                          baselines=baselines, alone=alone, progress=progress, log=log)
    return load(result.model_dir)
