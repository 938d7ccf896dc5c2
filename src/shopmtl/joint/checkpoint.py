"""A joint model's directory: safetensors weights and the JSON needed to rebuild every head
(manifest-verified on load, written atomically, as ``train.checkpoint``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from shopmtl.config import to_dict
from shopmtl.data.schema import TaskSpec
from shopmtl.joint.config import REC, JointConfig
from shopmtl.joint.model import JointModel, RankHead, SharedText, TableHead
from shopmtl.joint.parts import text_width, vector_width
from shopmtl.jsonsafe import json_safe
from shopmtl.train import checkpoint as ck


def save_joint_dir(path: Path, model: JointModel, cfg: JointConfig, parts: list[Any]
                   ) -> None:
    """Weights (safetensors) plus everything needed to rebuild the heads: task specs, id
    sizes and numeric widths per source; the rec source's schema, encoders and catalog."""
    tensors: dict[str, dict[str, Tensor]] = {"model": dict(model.state_dict())}
    sources = {}
    for p in parts:  # each part says what rebuilds it (``describe``) and what it stores once
        sources[p.name] = p.describe(model)
        tensors.update(p.extra_tensors())
    ck.write_dir(path, tensors, {
        "config": to_dict(cfg),
        "sources": json_safe(sources),
        "meta": ck.model_meta("joint", model_tasks(sources), sources=list(sources)),
    })


def model_tasks(sources: dict[str, Any]) -> list[str]:
    """Every task of a joint model, source by source (``sources.json`` as written or loaded)."""
    names = []
    for name, s in sources.items():
        if name == REC:
            names += [t["name"] for t in s["schema"]["tasks"]]
        else:
            names += [t["name"] for t in s["tasks"]]
    return names


def load_joint_dir(path: str | Path, verify: bool = True
                   ) -> tuple[JointModel, JointConfig, dict[str, Any]]:
    """Rebuild the joint model from its directory (manifest verified first, unless the caller
    just did: ``verify=False``). The text bank is empty: ``predict`` fills it with the texts it
    is asked about."""
    from shopmtl.config import from_dict
    from shopmtl.data.encoders import Encoders
    from shopmtl.data.schema import Schema
    from shopmtl.registry import build_model

    path = Path(path)
    if verify:
        ck.verify_dir(path)
    cfg = from_dict(JointConfig, ck.read_json(path, "config"), "joint")
    sources = ck.read_json(path, "sources")
    lora = cfg.text.encoder if cfg.text.mode == "lora" else None
    text = SharedText(text_width(cfg), cfg.model, lora_encoder=lora,
                      ngram_buckets=cfg.text.ngram_buckets)
    heads: dict[str, nn.Module] = {}
    rec = None
    for name, s in sources.items():
        if name == REC:
            schema = from_dict(Schema, s["schema"])
            content = ck.read_tensors(path, "rec_content") if schema.content_features else None
            enc = Encoders.from_json(schema, s["encoders"], content)
            sizes = {f.name: enc.vocab_size(f) for f in schema.features if f.kind != "numeric"}
            rec = build_model(s["args"]["model"], s["args"]["model_args"], schema, sizes, content)
            s["_schema"], s["_encoders"] = schema, enc
            continue
        tasks = tuple(from_dict(TaskSpec, t) for t in s["tasks"])
        if s["ranking"]:
            heads[name] = RankHead(tasks[0], cfg.model.text_dim, s["id_sizes"], cfg.model)
        else:
            wide = cfg.text.ngram_buckets if (cfg.model.wide and s["has_text"]) else 0
            vec = vector_width(cfg) if s["has_text"] else 0
            heads[name] = TableHead(tasks, cfg.model.text_dim if s["has_text"] else 0,
                                    s["numeric"], s["id_sizes"], cfg.model, wide_buckets=wide,
                                    vector_width=vec)
        shared = s.get("shared_ids", [])
        if shared:  # placeholders of the right shape; load_state_dict fills the row maps
            heads[name].share({k: torch.full((s["id_sizes"][k],), -1) for k in shared})
        s["_tasks"] = tasks
    model = JointModel(text, heads, rec)
    try:
        model.load_state_dict(ck.read_tensors(path, "model"))
    except RuntimeError as e:
        raise ck.CheckpointError(f"{path}: weights do not fit the model ({e})") from None
    model.eval()
    return model, cfg, sources


def task_owner(sources: dict[str, Any], task: str) -> str:
    for name, s in sources.items():
        names = ([t.name for t in s["_schema"].tasks] if name == REC
                 else [t.name for t in s["_tasks"]])
        if task in names:
            return name
    known = sorted(t for n, s in sources.items() for t in (
        [x.name for x in s["_schema"].tasks] if n == REC else [x.name for x in s["_tasks"]]))
    raise KeyError(f"unknown task {task!r}; this model answers: {known}")


