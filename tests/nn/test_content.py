"""Content towers inside FeatureEmbedding: every registered model trains with text + image
fields, a content field reaches the logits, LoRA fine-tunes only its adapters, and a schema
without content features builds no content module."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from shopmtl.data.dataset import Batch
from shopmtl.data.pipeline import PreparedData
from shopmtl.data.schema import FeatureSpec, Schema, TaskSpec
from shopmtl.nn.content import ImageTower
from shopmtl.nn.layers import FeatureEmbedding
from shopmtl.registry import MODELS, build_model
from tests.helpers import content_world
from tests.models.tiny import SMALL

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_steps(model: torch.nn.Module, batch: Batch, opt: torch.optim.Optimizer,
                 steps: int) -> list[float]:
    """Train ``steps`` times on one batch; the summed task loss before each step."""
    losses = []
    for _ in range(steps):
        model.train()
        loss = model.task_losses(model(batch), batch).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return content_world(tmp_path_factory.mktemp("content_world"))


def _model(name: str, data: PreparedData, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(name, SMALL.get(name, {}), data.schema, data.vocab_sizes,
                       data.encoders.content_tensors())


def test_batches_carry_content_rows_and_cold_items_keep_their_content(
    data: PreparedData,
) -> None:
    assert data.train.content.shape[1] == 2 and data.train.content.dtype == torch.int64
    assert data.test is not None
    cold = data.test.slices[:, 0]
    assert cold.any()
    item = data.schema.of_kind("categorical").index(
        next(f for f in data.schema.features if f.name == "item_id"))
    assert (data.test.cat[cold, item] == 0).all()  # new items are OOV for the id embedding
    assert (data.test.content[cold] > 0).all()  # ... but have a title and an image


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_with_text_and_image_fields(name: str, data: PreparedData) -> None:
    model = _model(name, data)
    assert model.embed.content is not None
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    batch = next(data.train.batches(256, seed=1))
    losses = _train_steps(model, batch, opt, 8)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    tower = model.embed.content.towers["image"]
    assert tower.out.weight.grad is not None and tower.out.weight.grad.abs().sum() > 0


def test_content_reaches_the_logits(data: PreparedData) -> None:
    model = _model("shared_bottom", data).eval()
    batch = next(data.train.batches(64, shuffle=False))
    other = Batch(**{**batch.__dict__, "content": torch.zeros_like(batch.content)})
    a, b = model(batch)["click"], model(other)["click"]
    assert not torch.allclose(a, b)


def test_no_content_features_no_content_module() -> None:
    schema = Schema((FeatureSpec("x", "categorical"),), (TaskSpec("click"),))
    emb = FeatureEmbedding(schema, {"x": 5}, 4)
    assert emb.content is None and emb.num_fields == 2
    assert not any("content" in k for k in emb.state_dict())


def test_image_tower_shape() -> None:
    out = ImageTower(8)(torch.randint(0, 255, (5, 3, 16, 16), dtype=torch.uint8))
    assert out.shape == (5, 8)


def test_lora_text_tower_trains_adapters_only(tmp_path: Path) -> None:
    titles = ["red cotton shirt", "blue steel knife", "green wool scarf", "black leather bag"]
    pq.write_table(pa.table({"item_id": [1, 2, 3, 4], "title": titles}), tmp_path / "items.pq")
    spec = FeatureSpec("title", "text", key="item_id", table=str(tmp_path / "items.pq"),
                       mode="lora", max_tokens=8)
    schema = Schema((FeatureSpec("item_id", "categorical"), spec), (TaskSpec("click"),))
    from shopmtl.data.content import ContentEncoder

    enc = ContentEncoder(spec).fit()
    content = {f"title.{k}": v for k, v in enc.tensors().items()}
    torch.manual_seed(0)
    model = build_model("shared_bottom", SMALL["shared_bottom"], schema,
                        {"item_id": 5, "title": enc.rows}, content)
    # the label is "is it red or green": only the title can tell (the ids are all OOV)
    rows = torch.tensor([1, 2, 3, 4, 0] * 4)
    zeros = torch.zeros(20, dtype=torch.long)
    batch = Batch(cat=zeros[:, None], num=torch.zeros(20, 0),
                  seq=torch.zeros(20, 0, 0, dtype=torch.long), scenario=zeros,
                  labels=torch.tensor([1.0, 0, 1, 0, 0] * 4)[:, None],
                  mask=torch.ones(20, 1, dtype=torch.bool), content=rows[:, None])
    named = dict(model.named_parameters())
    lora_b = {k: v.detach().clone() for k, v in named.items() if "lora_B" in k}
    base = {k: v.detach().clone() for k, v in named.items()
            if "encoder" in k and "lora_" not in k}
    assert len(lora_b) == 12 and base  # 6 layers x (query, value)
    assert not any(named[k].requires_grad for k in base)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = _train_steps(model, batch, opt, 6)
    assert losses[-1] < losses[0]
    assert all(not torch.equal(named[k], v) for k, v in lora_b.items())
    assert all(torch.equal(named[k], v) for k, v in base.items())
