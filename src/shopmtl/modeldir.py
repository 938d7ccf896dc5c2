"""One model-directory format, one loader, one predict path: ``shopmtl.load(path)``.

Every trained model is a directory written by ``train.checkpoint.write_dir`` (safetensors
weights, JSON files, a SHA-256 ``manifest.json``). Its ``meta.json`` says what it holds, the
same keys for every kind (format 2, ``train.checkpoint.model_meta``)::

    {"format": 2, "kind": "zoo" | "joint" | "onnx", "shopmtl_version": "0.1.0",
     "tasks": [every task name], ...the kind's own keys}

(zoo: ``model``, ``epoch``, ``valid_metric``; joint: ``sources``; onnx, a bundle of
``shopmtl export``: ``model_file``, ``precision``, ``inputs``, ``source``, ``checks``, ...).
Format-1 directories (written before) still load: a format-1 meta without ``kind`` is a zoo
model, ``kind: joint`` a joint one.

``load`` verifies the manifest, reads the kind and calls that kind's loader in ``KINDS``; the
``Model`` it returns answers ``predict`` in memory (the Python API) and ``predict_file`` /
``evaluate_file`` (``shopmtl predict`` / ``shopmtl evaluate``) through the same parsing and
scoring code: ``predict.score_chunks`` for zoo rows (read by the reader of training,
``data.ingest.read_chunks``), ``joint.predict.answer_requests`` for the joint model's other
tasks (raw requests checked by their source's contract, ``data.contract``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from shopmtl.train import checkpoint as ck

if TYPE_CHECKING:
    from shopmtl.data.contract import Contract
    from shopmtl.predict import RowReport

PathLike = str | Path


class Model:
    """A loaded model directory: ``kind`` ("zoo", "joint" or "onnx"), ``tasks`` (every task name),
    ``path``; ``predict(rows, task=None, bad_rows="fail", id_columns=())`` returns a
    ``pyarrow.Table`` in row order."""

    kind: str

    def __init__(self, path: Path, tasks: list[str], meta: dict[str, Any]) -> None:
        self.path, self.tasks, self.meta = path, tuple(tasks), meta

    def __repr__(self) -> str:
        return f"<shopmtl.Model kind={self.kind!r} tasks={list(self.tasks)} path='{self.path}'>"

    def predict(self, rows: Any, task: str | list[str] | None = None, bad_rows: str = "fail",
                id_columns: Sequence[str] = (), top_k: int = 1, all_classes: bool = False
                ) -> pa.Table:
        raise NotImplementedError

    def predict_file(self, path: PathLike, out: PathLike, tasks: list[str] | None = None,
                     bad_rows: str = "fail", id_columns: Sequence[str] = (),
                     fmt: str | None = None, top_k: int = 1, all_classes: bool = False
                     ) -> RowReport:
        """``shopmtl predict``: predictions of every good row of ``path`` written to ``out``
        (bad rows: ``predict.predict_rows``)."""
        raise NotImplementedError

    def contract(self, task: str) -> Contract:
        """What ``task`` reads and answers (``data.contract``; ``shopmtl describe``)."""
        raise NotImplementedError

    def evaluate_file(self, path: PathLike, bad_rows: str = "fail", out: PathLike | None = None
                      ) -> tuple[dict, RowReport]:
        """``shopmtl evaluate``: metrics per task x scenario of a labelled file, and its rows
        (under quarantine the bad rows go next to ``out``)."""
        raise NotImplementedError


def _task_list(task: str | list[str] | None) -> list[str] | None:
    if task is None:
        return None
    return [task] if isinstance(task, str) else list(task)


class ZooModel(Model):
    """A zoo model (``shopmtl train`` on an experiment config). ``predict`` takes a pandas
    DataFrame, a pyarrow Table, a list of dicts (the training columns; labels not needed) or a
    CSV/Parquet path, and gives the ``id_columns`` as read and one float column per task
    (``task``: only those); a bad row raises, or under ``bad_rows="quarantine"`` is left out
    (``predict.predict_in_memory``)."""

    kind = "zoo"

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        from shopmtl.train.trainer import load_model_dir

        self.model, self.cfg, self.schema, self.encoders = load_model_dir(path, verify=False)
        super().__init__(path, list(self.schema.task_names), meta)

    def predict(self, rows: Any, task: str | list[str] | None = None, bad_rows: str = "fail",
                id_columns: Sequence[str] = (), top_k: int = 1, all_classes: bool = False
                ) -> pa.Table:
        from shopmtl.predict import predict_in_memory

        return predict_in_memory(self.model, self.schema, self.encoders, rows, _task_list(task),
                                 bad_rows, id_columns)

    def predict_file(self, path: PathLike, out: PathLike, tasks: list[str] | None = None,
                     bad_rows: str = "fail", id_columns: Sequence[str] = (),
                     fmt: str | None = None, top_k: int = 1, all_classes: bool = False
                     ) -> RowReport:
        from shopmtl.predict import predict_rows

        return predict_rows(self.model, self.schema, self.encoders, path, out, tasks,
                            bad_rows=bad_rows, id_columns=id_columns, fmt=fmt,
                            chunk_rows=self.cfg.data.chunk_rows)

    def contract(self, task: str) -> Contract:
        from shopmtl.data.contract import table_contract

        _known(self, task)
        return table_contract("table", self.schema, self.encoders)

    def evaluate_file(self, path: PathLike, bad_rows: str = "fail", out: PathLike | None = None
                      ) -> tuple[dict, RowReport]:
        from shopmtl.predict import evaluate_rows

        return evaluate_rows(self.model, self.cfg, self.schema, self.encoders, path, bad_rows,
                             out)


class OnnxBundle(ZooModel):
    """A zoo model exported by ``shopmtl export`` (``shopmtl.export.bundle``): its ONNX graph,
    run by onnxruntime, with the source's config, schema and encoders. It answers ``predict``,
    ``predict_file``, ``evaluate_file`` and ``contract`` as its source does, through the same
    reader and encoders (``predict.score_chunks``): only the forward differs, an onnxruntime
    session (``export.runtime.OnnxForward``) in place of the PyTorch model. ``meta`` holds what
    was measured at export (``meta["checks"]``)."""

    kind = "onnx"
    MODEL_FILES = ("model.onnx", "model.int8.onnx")

    def __init__(self, path: Path, meta: dict[str, Any], threads: int = 0) -> None:
        from shopmtl.export.runtime import OnnxForward
        from shopmtl.train.modelfiles import read_model_files

        graph = meta.get("model_file")
        if graph not in self.MODEL_FILES:
            raise ck.CheckpointError(f"{path}/meta.json: model_file {graph!r} is not one of "
                                     f"{', '.join(self.MODEL_FILES)}")
        self.cfg, self.schema, self.encoders, _ = read_model_files(path)
        self.model = OnnxForward(path / graph, self.schema, threads)  # a predict.Forward
        Model.__init__(self, path, list(self.schema.task_names), meta)


class JointModelDir(Model):
    """A joint model (``shopmtl train`` on a joint config): one task at a time. A rec task
    takes the rows of a zoo model; any other task the raw requests of its source's contract
    (``contract(task)``, ``shopmtl describe``) as dicts, a pyarrow Table, a DataFrame or a
    JSON-lines/CSV/Parquet path. The result has the columns ``shopmtl predict --task`` writes
    (``joint/predict.py``): the answer in the user's terms (labels top-k, clamped values, named
    quantiles; a ranking task one row per candidate, best first)."""

    kind = "joint"

    def __init__(self, path: Path, meta: dict[str, Any]) -> None:
        from shopmtl.joint.checkpoint import load_joint_dir, model_tasks

        self.model, self.cfg, self.sources = load_joint_dir(path, verify=False)
        super().__init__(path, model_tasks(self.sources), meta)

    def _one(self, tasks: list[str] | None, how: str) -> str:
        if not tasks or len(tasks) != 1:
            from shopmtl.predict import OptionError

            raise OptionError(f"a joint model answers one task at a time: pass {how}")
        return tasks[0]

    def predict(self, rows: Any, task: str | list[str] | None = None, bad_rows: str = "fail",
                id_columns: Sequence[str] = (), top_k: int = 1, all_classes: bool = False
                ) -> pa.Table:
        from shopmtl.joint.predict import predict_joint_memory

        name = self._one(_task_list(task), "task=NAME")
        return predict_joint_memory(self.model, self.cfg, self.sources, rows, name,
                                    bad_rows=bad_rows, id_columns=id_columns, top_k=top_k,
                                    all_classes=all_classes)

    def predict_file(self, path: PathLike, out: PathLike, tasks: list[str] | None = None,
                     bad_rows: str = "fail", id_columns: Sequence[str] = (),
                     fmt: str | None = None, top_k: int = 1, all_classes: bool = False
                     ) -> RowReport:
        from shopmtl.joint.predict import predict_joint_rows

        name = self._one(tasks, "--task NAME")
        return predict_joint_rows(self.model, self.cfg, self.sources, path, out, name,
                                  bad_rows=bad_rows, id_columns=id_columns, fmt=fmt,
                                  top_k=top_k, all_classes=all_classes)

    def contract(self, task: str) -> Contract:
        from shopmtl.data.contract import table_contract
        from shopmtl.joint.config import REC
        from shopmtl.joint.predict import contract_of, owner_of

        owner = owner_of(self.sources, task)
        if owner == REC:
            s = self.sources[REC]
            return table_contract(REC, s["_schema"], s["_encoders"])
        return contract_of(self.cfg, self.sources, owner)

    def evaluate_file(self, path: PathLike, bad_rows: str = "fail", out: PathLike | None = None
                      ) -> tuple[dict, RowReport]:
        from shopmtl.predict import OptionError

        raise OptionError(f"{self.path}: a joint model is scored by its run (metrics.json, "
                        "report.md); `shopmtl evaluate` takes a zoo model directory")


def _known(model: Model, task: str) -> None:
    if task not in model.tasks:
        from shopmtl.predict import OptionError

        raise OptionError(f"--task: unknown task {task!r}; this model answers: "
                          f"{sorted(model.tasks)}")


def _load_zoo(path: Path, meta: dict[str, Any]) -> Model:
    return ZooModel(path, meta)


def _load_joint(path: Path, meta: dict[str, Any]) -> Model:
    return JointModelDir(path, meta)


def _load_onnx(path: Path, meta: dict[str, Any]) -> Model:
    return OnnxBundle(path, meta)


# kind (meta.json "kind") -> its loader: (directory, meta) -> Model
KINDS: dict[str, Callable[[Path, dict[str, Any]], Model]] = {
    "zoo": _load_zoo,
    "joint": _load_joint,
    "onnx": _load_onnx,
}
FORMATS = (1, ck.FORMAT)


def kind_of(path: PathLike, meta: Any) -> str:
    """The kind of a model directory from its ``meta.json``: format 2 names it; format 1 named
    only joint directories (a format-1 meta without ``kind`` is a zoo model)."""
    fmt = meta.get("format") if isinstance(meta, dict) else None
    kind = meta.get("kind", "zoo" if fmt == 1 else None) if isinstance(meta, dict) else None
    if fmt not in FORMATS or kind not in KINDS:
        raise ck.CheckpointError(
            f"{path}: unknown model directory (meta.json format {fmt!r}, kind {kind!r}); "
            f"known kinds: {', '.join(KINDS)} (formats {', '.join(map(str, FORMATS))})")
    return kind


def load(path: PathLike, *, onnx_threads: int = 0) -> Model:
    """Load any model directory (``OUT/model`` of ``shopmtl train``/``quickstart``, or
    ``OUT/joint/model`` of a joint run): the manifest is verified, then ``meta.json``'s kind
    picks the loader. A missing, tampered or unknown directory raises ``CheckpointError``.
    ``onnx_threads``: the intra-op threads of an ONNX bundle's onnxruntime session (0:
    onnxruntime's default, one per core; the service uses 1: ``serve.reload``)."""
    path = Path(path)
    ck.verify_dir(path)
    meta = ck.read_json(path, "meta")
    kind = kind_of(path, meta)
    if kind == OnnxBundle.kind:
        return OnnxBundle(path, meta, threads=onnx_threads)
    return KINDS[kind](path, meta)
