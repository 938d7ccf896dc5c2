"""A seeded synthetic e-commerce world whose ground truth is known (the embedded default).

Users (latent taste, demographics, heavy-tailed activity) meet items (latent attributes, a
category tree, brand, price, a title, a launch day) in several scenarios (home feed, search, ad
slot, product page) with their own traffic share, base rates and position bias. Each label is drawn
from a true probability that is kept, so the Bayes-optimal ("oracle") AUC and logloss of every
task x scenario can be put beside any model's.

True click logit, per impression (``true_probabilities``: the one truth, shared with the
simulated shop of ``abtest.shop``) (user u, item i, scenario s, position p)::

    z = base[s] + A[seg_u, top_i] + price_u,i        # observable: segment x category, price
        + b_u + b_i + sigma_aff * <u_u, v_i>         # latent: per-user, per-item, affinity
        + shift * sigma_aff * <u_u * d_s, v_i>       # scenario-specific taste (scenario shift)
        - decay[s] * p                               # position bias

Conversion (observed only after a click) shares the latent part with weight ``task_correlation``
(negative values make the tasks conflict, which provokes negative transfer); ad click exists only
in the ad slot. Generation is chunked, so 1e8 rows stream to Parquet in constant memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shopmtl.config import SYNTHETIC_TASKS
from shopmtl.data.schema import FeatureSpec, ScenarioSpec, Schema, TaskSpec
from shopmtl.keys import key as _key  # `key` is a loop variable below

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class WorldConfig:
    rows: int = _key(4_000_000, "impressions generated", ge=1000)
    seed: int = _key(0, "seed of the world", ge=0)
    n_users: int = _key(3_000, "users", ge=1)
    n_items: int = _key(1_500, "items", ge=1)
    n_top_categories: int = _key(8, "top-level categories", ge=1)
    leaves_per_top: int = _key(5, "leaf categories under each top one", ge=1)
    n_brands: int = _key(96, "brands", ge=1)
    n_segments: int = _key(6, "user segments", ge=1)
    latent_dim: int = _key(4, "width of the latent user taste and item attributes", ge=1)
    n_days: int = _key(30, "days of traffic", ge=3)
    # train < 24 <= valid < 27 <= test
    split_days: tuple[int, int] = _key((24, 27), "first day of valid, first day of test", ge=1)
    scenarios: tuple[str, ...] = _key(("home_feed", "search", "ad_slot", "product_page"),
                                     "the scenarios (the next five keys: one value each)")
    traffic: tuple[float, ...] = _key((0.45, 0.25, 0.15, 0.15), "share of impressions per "
                                     "scenario (sums to 1)", ge=0, le=1)
    click_base: tuple[float, ...] = _key((-3.6, -3.1, -3.9, -3.3), "base click logit per "
                                        "scenario", finite=True)
    position_decay: tuple[float, ...] = _key((0.05, 0.12, 0.12, 0.08), "position bias per "
                                            "scenario: logit lost per position", ge=0)
    max_position: tuple[int, ...] = _key((20, 20, 4, 10), "positions shown per scenario", ge=1)
    personalised: tuple[float, ...] = _key((0.6, 0.8, 0.4, 0.5), "share of impressions chosen "
                                          "by taste per scenario", ge=0, le=1)
    segment_category_scale: float = _key(0.7, "weight of segment x category affinity", ge=0)
    user_bias_scale: float = _key(0.3, "spread of the per-user click bias", ge=0)
    item_bias_scale: float = _key(0.5, "spread of the per-item click bias", ge=0)
    affinity_scale: float = _key(0.6, "weight of the latent user x item affinity", ge=0)
    scenario_shift: float = _key(0.3, "how much taste differs between scenarios", ge=0)
    task_correlation: float = _key(0.7, "latent part shared by click and conversion (< 0: "
                                       "conflicting tasks)", ge=-1, le=1)
    ad_correlation: float = _key(0.6, "latent part shared by click and ad click", ge=-1, le=1)
    conversion_base: float = _key(-3.1, "base conversion logit", finite=True)
    ad_click_base: float = _key(-3.6, "base ad-click logit", finite=True)
    activity_sigma: float = _key(1.0, "lognormal user activity: heavy tail", ge=0)
    popularity_exponent: float = _key(0.9, "Zipf exponent of item popularity", ge=0)
    cold_start_fraction: float = _key(0.06, "share of items launched on the first test day",
                                     ge=0, lt=1)
    cold_start_share: float = _key(0.03, "share of test impressions that show new items",
                                  ge=0, le=1)
    history_len: int = _key(10, "length of the behaviour history", ge=1)
    chunk_rows: int = _key(500_000, "rows generated at a time (constant memory)", ge=1)

TASKS = SYNTHETIC_TASKS


def default_schema(cfg: WorldConfig = WorldConfig()) -> Schema:
    """How the world's columns map to features, scenarios and tasks."""
    cat = "categorical"
    return Schema(
        features=(
            FeatureSpec("user_id", cat, min_count=2),
            FeatureSpec("item_id", cat, min_count=2),
            FeatureSpec("segment", cat),
            FeatureSpec("age_bucket", cat),
            FeatureSpec("gender", cat),
            FeatureSpec("top_category", cat),
            FeatureSpec("leaf_category", cat),
            FeatureSpec("brand", cat),
            FeatureSpec("position", cat),
            FeatureSpec("price", "numeric", transform="log1p"),
            FeatureSpec(
                "hist_leaf", "sequence", max_len=cfg.history_len, vocab_from="leaf_category"
            ),
        ),
        tasks=(
            TaskSpec("click", oracle_column="true_click"),
            TaskSpec("conversion", given="click", oracle_column="true_conversion"),
            TaskSpec("ad_click", scenarios=("ad_slot",), oracle_column="true_ad_click"),
        ),
        scenario=ScenarioSpec("scenario", cfg.scenarios),
        group="user_id",
    )


@dataclass
class World:
    """Entity tables and the parameters of the true probabilities (everything but impressions)."""

    cfg: WorldConfig
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.__dict__["arrays"][name]
        except KeyError:
            raise AttributeError(name) from None


def _check(cfg: WorldConfig) -> None:
    s = len(cfg.scenarios)
    for name in ("traffic", "click_base", "position_decay", "max_position", "personalised"):
        if len(getattr(cfg, name)) != s:
            raise ValueError(f"world: '{name}' needs one value per scenario ({s})")
    if not math.isclose(sum(cfg.traffic), 1.0, abs_tol=1e-6):
        raise ValueError("world: traffic shares must sum to 1")
    if not -1.0 <= cfg.task_correlation <= 1.0 or not -1.0 <= cfg.ad_correlation <= 1.0:
        raise ValueError("world: correlations must lie in [-1, 1]")
    if cfg.rows < 1000:
        raise ValueError("world: rows must be >= 1000")


def build_world(cfg: WorldConfig) -> World:
    _check(cfg)
    rng = np.random.default_rng([cfg.seed, 0])
    k, n_u, n_i = cfg.latent_dim, cfg.n_users, cfg.n_items
    n_top = cfg.n_top_categories
    n_leaf = n_top * cfg.leaves_per_top
    a: dict[str, np.ndarray] = {}

    # users: observable demographics, heavy-tailed activity, latent taste
    seg_p = rng.dirichlet(np.full(cfg.n_segments, 4.0))
    a["segment"] = rng.choice(cfg.n_segments, n_u, p=seg_p)
    a["age_bucket"] = rng.integers(0, 7, n_u)
    a["gender"] = rng.choice(3, n_u, p=[0.48, 0.48, 0.04])
    act = rng.lognormal(0.0, cfg.activity_sigma, n_u)
    a["user_p"] = act / act.sum()
    a["u_lat"] = rng.normal(0, 1 / math.sqrt(k), (n_u, k))  # <u, v> has unit variance
    a["u_lat2"] = rng.normal(0, 1 / math.sqrt(k), (n_u, k))  # conversion-only taste
    a["b_u"] = rng.normal(0, cfg.user_bias_scale, n_u)
    a["b_u2"] = rng.normal(0, cfg.user_bias_scale, n_u)
    a["ad_tolerance"] = rng.normal(0, 0.6, n_u)

    # items: category tree, brand, price, attributes, latent vector, popularity, launch day
    a["leaf_top"] = np.repeat(np.arange(n_top), cfg.leaves_per_top)
    a["leaf"] = rng.integers(0, n_leaf, n_i)
    a["top"] = a["leaf_top"][a["leaf"]]
    brands_per_top = max(1, cfg.n_brands // n_top)
    a["brand"] = a["top"] * brands_per_top + rng.integers(0, brands_per_top, n_i)
    a["color"] = rng.integers(0, len(COLORS), n_i)
    a["material"] = rng.integers(0, len(MATERIALS), n_i)
    cat_price = rng.uniform(2.0, 5.0, n_top)
    a["cat_price"] = cat_price
    a["log_price"] = cat_price[a["top"]] + rng.normal(0, 0.5, n_i)
    c_leaf = rng.normal(0, 1, (n_leaf, k))
    c_color = rng.normal(0, 1, (len(COLORS), k))
    c_mat = rng.normal(0, 1, (len(MATERIALS), k))
    noise = rng.normal(0, 1, (n_i, k))
    # attributes carry part of the item's latent vector: text describes it (cold start helps)
    a["v_lat"] = (
        0.5 * c_leaf[a["leaf"]]
        + 0.45 * c_color[a["color"]]
        + 0.35 * c_mat[a["material"]]
        + math.sqrt(1 - 0.25 - 0.2025 - 0.1225) * noise
    )
    a["v_lat2"] = rng.normal(0, 1, (n_i, k))
    a["b_i"] = rng.normal(0, cfg.item_bias_scale, n_i)
    a["b_i2"] = rng.normal(0, cfg.item_bias_scale, n_i)
    a["brand_ad_quality"] = rng.normal(0, 0.5, cfg.n_brands)
    ranks = rng.permutation(n_i) + 1
    a["item_pop"] = ranks.astype(float) ** -cfg.popularity_exponent
    n_new = round(cfg.cold_start_fraction * n_i)
    is_new = np.zeros(n_i, bool)
    is_new[rng.choice(n_i, n_new, replace=False)] = True
    a["is_new"] = is_new

    # observable segment x category affinity; scenario-specific taste directions
    a["A"] = rng.normal(0, cfg.segment_category_scale, (cfg.n_segments, n_top))
    a["price_sens"] = rng.uniform(0.1, 0.6, cfg.n_segments)
    # scenario-specific taste flips the sign of some latent dimensions: every scenario's shift
    # term then has the same variance, (scenario_shift * affinity_scale)^2
    a["d_s"] = rng.choice([-1.0, 1.0], (len(cfg.scenarios), k))
    # where a personalised slot draws its category from: segment taste + the user's own taste
    c_top = np.stack([c_leaf[a["leaf_top"] == t].mean(0) for t in range(n_top)])
    pref = a["A"][a["segment"]] + 0.8 * (a["u_lat"] @ c_top.T)  # [U, top]
    pref = np.exp(2.0 * (pref - pref.max(1, keepdims=True)))
    a["user_top_p"] = pref / pref.sum(1, keepdims=True)
    # a static behaviour history: leaves the user engaged with, most recent last
    hist_top = _sample_rows(rng, a["user_top_p"], cfg.history_len)  # [U, L]
    hist_leaf = hist_top * cfg.leaves_per_top + rng.integers(0, cfg.leaves_per_top, hist_top.shape)
    n_hist = rng.integers(0, cfg.history_len + 1, n_u)  # new users have short histories
    a["hist_leaf"] = np.array(
        [
            "|".join(map(str, h[cfg.history_len - m :]))
            for h, m in zip(hist_leaf, n_hist, strict=False)
        ],
        object,
    )
    return World(cfg, a)


COLORS = (
    "black",
    "white",
    "red",
    "blue",
    "green",
    "grey",
    "beige",
    "pink",
    "navy",
    "brown",
    "yellow",
    "purple",
)
MATERIALS = ("cotton", "leather", "steel", "wooden", "ceramic", "linen", "plastic", "wool")
TOP_NAMES = ("fashion", "home", "electronics", "beauty", "sports", "toys", "garden", "kitchen")


def item_titles(world: World) -> list[str]:
    """Deterministic titles from attribute and category words (the text the item side carries)."""
    cfg = world.cfg
    out = []
    for i in range(cfg.n_items):
        top = TOP_NAMES[world.top[i] % len(TOP_NAMES)]
        out.append(
            f"{COLORS[world.color[i]]} {MATERIALS[world.material[i]]} {top} "
            f"item type {world.leaf[i]} brand {world.brand[i]}"
        )
    return out


# RGB of each colour word; the image background
COLOR_RGB = (
    (20, 20, 20), (245, 245, 245), (220, 30, 30), (30, 80, 220), (30, 160, 60), (128, 128, 128),
    (225, 205, 170), (245, 150, 190), (20, 30, 100), (120, 70, 30), (240, 220, 40), (130, 40, 160),
)
IMAGE_SIZE = 16  # rendered item images are IMAGE_SIZE x IMAGE_SIZE x 3 uint8


def _material_patterns(size: int) -> np.ndarray:
    """One texture mask per material [M, size, size]: stripes, checks and dots of different
    orientations and frequencies, so a small CNN can tell the materials apart."""
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([
        (y // 2) % 2 == 0,  # cotton: fine horizontal stripes
        (x // 4) % 2 == 0,  # leather: wide vertical stripes
        ((y // 2) + (x // 2)) % 2 == 0,  # steel: fine checks
        ((y // 4) + (x // 4)) % 2 == 0,  # wooden: coarse checks
        (y % 4 == 1) & (x % 4 == 1),  # ceramic: sparse dots
        ((x + y) // 2) % 2 == 0,  # linen: diagonal stripes
        np.zeros((size, size), bool),  # plastic: plain
        (y % 2 == 0) & (x % 2 == 0),  # wool: dense dots
    ])


def item_images(world: World, size: int = IMAGE_SIZE) -> np.ndarray:
    """Deterministic item images uint8 [n_items, size, size, 3]: the item's colour as the
    background, its material as a texture (a darker or lighter shade of the colour), and a
    mark in the top-left corner whose shade encodes the top category. Colour and material are
    not impression columns but part of the item's latent vector: images (like titles) carry
    what an id-only model cannot know about a new item."""
    rgb = np.asarray(COLOR_RGB, np.float64)[world.color]  # [N, 3]
    light = rgb.mean(1, keepdims=True) > 128
    shade = np.where(light, rgb * 0.45, rgb + (255 - rgb) * 0.55)  # texture colour
    pattern = _material_patterns(size)[world.material]  # [N, size, size]
    img = np.where(pattern[..., None], shade[:, None, None, :], rgb[:, None, None, :])
    n_top = max(world.cfg.n_top_categories, 2)
    mark = (world.top / (n_top - 1) * 255)[:, None]  # [N, 1] grey level per top category
    img[:, :3, :3, :] = mark[:, None, None, :]
    return np.rint(img).astype(np.uint8)


def content_features(items_path: str | Path, content: tuple[str, ...] = ("title", "image")
                     ) -> tuple[FeatureSpec, ...]:
    """The world's item content features, keyed by item_id in the catalog ``items_path``:
    ``title`` (text, frozen MiniLM vectors) and ``image`` (the rendered images)."""
    specs = {
        "title": FeatureSpec("title", "text", key="item_id", table=str(items_path)),
        "image": FeatureSpec("image", "image", key="item_id", table=str(items_path),
                             image_size=(IMAGE_SIZE, IMAGE_SIZE)),
    }
    unknown = [c for c in content if c not in specs]
    if unknown:
        raise ValueError(f"synthetic content: unknown {unknown}; valid: {sorted(specs)}")
    return tuple(specs[c] for c in content)


def content_schema(cfg: WorldConfig, items_path: str | Path,
                   content: tuple[str, ...] = ("title", "image")) -> Schema:
    """``default_schema`` plus the item content features and the cold-start evaluation slice
    (``is_new_item``: items launched in the test period, unseen in training)."""
    base = default_schema(cfg)
    return Schema(base.features + content_features(items_path, content), base.tasks,
                  base.scenario, base.group, slices=("is_new_item",))


def _sample_rows(rng: np.random.Generator, p: np.ndarray, n: int) -> np.ndarray:
    """Draw n categories per row of the probability matrix p (vectorised inverse CDF)."""
    cdf = np.cumsum(p, axis=1)
    r = rng.random((p.shape[0], n))
    idx = (r[:, :, None] > cdf[:, None, :]).sum(-1)
    return np.minimum(idx, p.shape[1] - 1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def draw_items(world: World, rng: np.random.Generator, u: np.ndarray, s: np.ndarray,
               may_show_new: np.ndarray) -> np.ndarray:
    """The items the world shows users ``u`` in scenarios ``s`` (indices): by the user's taste
    (a recommender, with the scenario's ``personalised`` share) or by popularity, within a top
    category; a new item only where ``may_show_new`` (from the first test day on), with the
    ``cold_start_share``. ``impressions`` and the simulated shop's candidates draw through it."""
    cfg, w = world.cfg, world
    n, n_top = len(u), cfg.n_top_categories
    personal = rng.random(n) < np.asarray(cfg.personalised)[s]
    top = np.where(personal, _sample_rows(rng, w.user_top_p[u], 1)[:, 0], rng.integers(0, n_top, n))
    show_new = may_show_new & (rng.random(n) < cfg.cold_start_share)
    item = np.empty(n, np.int64)
    for t in range(n_top):
        for new in (False, True):
            rows = np.flatnonzero((top == t) & (show_new == new))
            pool = np.flatnonzero((w.top == t) & (w.is_new == new))
            if len(rows) == 0:
                continue
            if len(pool) == 0:  # no new item in this category: fall back to established ones
                pool = np.flatnonzero((w.top == t) & ~w.is_new)
            p = w.item_pop[pool] / w.item_pop[pool].sum()
            item[rows] = pool[rng.choice(len(pool), len(rows), p=p)]
    return item


def true_probabilities(world: World, u: np.ndarray, item: np.ndarray, s: np.ndarray,
                       pos: np.ndarray) -> dict[str, np.ndarray]:
    """The one truth: the probabilities of click, conversion given click and ad click of users
    ``u`` shown ``item`` in scenarios ``s`` (indices) at ``pos`` (0-based), with the parts of
    the click logit. ``impressions`` draws its labels from them and the simulated shop
    (``abtest.shop``) its users' responses and exact expected values."""
    cfg, w = world.cfg, world
    seg = w.segment[u]
    it = w.top[item]
    rel_price = w.log_price[item] - w.cat_price[it]
    observable = w.A[seg, it] - w.price_sens[seg] * rel_price
    uv = np.einsum("nk,nk->n", w.u_lat[u], w.v_lat[item])
    latent = w.b_u[u] + w.b_i[item] + cfg.affinity_scale * uv
    shift = (
        cfg.scenario_shift
        * cfg.affinity_scale
        * np.einsum("nk,nk->n", w.u_lat[u] * w.d_s[s], w.v_lat[item])
    )
    position = -np.asarray(cfg.position_decay)[s] * pos
    z_click = np.asarray(cfg.click_base)[s] + observable + latent + shift + position

    rho = cfg.task_correlation
    uv2 = np.einsum("nk,nk->n", w.u_lat2[u], w.v_lat2[item])
    own = w.b_u2[u] + w.b_i2[item] + cfg.affinity_scale * uv2
    z_conv = cfg.conversion_base + rho * latent + math.sqrt(1 - rho**2) * own - 0.6 * rel_price

    rho_ad = cfg.ad_correlation
    ad_own = w.ad_tolerance[u] + w.brand_ad_quality[w.brand[item]]
    z_ad = cfg.ad_click_base + rho_ad * (latent + shift) + math.sqrt(1 - rho_ad**2) * ad_own
    z_ad = z_ad + position
    return {
        "click": _sigmoid(z_click),
        "conversion": _sigmoid(z_conv),
        "ad_click": _sigmoid(z_ad),
        "_observable": observable,
        "_latent": latent + shift,
        "_position": position,
        "_z": z_click,
    }


def impressions(world: World, n: int, chunk: int) -> dict[str, np.ndarray]:
    """One chunk of n impression rows with labels and true probabilities (seeded by chunk)."""
    cfg, w = world.cfg, world
    rng = np.random.default_rng([cfg.seed, 1, chunk])
    s = rng.choice(len(cfg.scenarios), n, p=np.asarray(cfg.traffic))
    day = rng.integers(0, cfg.n_days, n)
    u = rng.choice(cfg.n_users, n, p=w.user_p)
    # candidate items: by the user's taste (a recommender) or by popularity; new items only
    # exist from the first test day on
    item = draw_items(world, rng, u, s, day >= cfg.split_days[1])
    pos = np.minimum(rng.geometric(0.18, n) - 1, np.asarray(cfg.max_position)[s] - 1)

    truth = true_probabilities(world, u, item, s, pos)
    # the draws keep their order (click, conversion, ad click): the data stays bit-identical
    p_click, p_conv, p_ad = truth["click"], truth["conversion"], truth["ad_click"]
    click = rng.random(n) < p_click
    conv = click & (rng.random(n) < p_conv)
    is_ad = np.asarray(cfg.scenarios)[s] == "ad_slot"
    ad_click = rng.random(n) < p_ad
    it = w.top[item]

    return {
        "user_id": u,
        "item_id": item,
        "segment": w.segment[u],
        "age_bucket": w.age_bucket[u],
        "gender": w.gender[u],
        "top_category": it,
        "leaf_category": w.leaf[item],
        "brand": w.brand[item],
        "position": pos,
        "price": np.round(np.exp(w.log_price[item]), 2),
        "hist_leaf": w.hist_leaf[u],
        "scenario": np.asarray(cfg.scenarios)[s],
        "day": day,
        "click": click,
        "conversion": conv,
        "conversion_observed": click,
        "ad_click": ad_click,
        "ad_click_observed": is_ad,
        "true_click": p_click,
        "true_conversion": p_conv,
        "true_ad_click": p_ad,
        "is_new_item": w.is_new[item],
        # variance decomposition of the click logit (diagnostics, not written to files)
        "_observable": truth["_observable"],
        "_latent": truth["_latent"],
        "_position": truth["_position"],
        "_z": truth["_z"],
    }


def to_table(rows: dict[str, np.ndarray]) -> pa.Table:
    """Impression rows as an Arrow table; unobserved labels are nulls, not zeros."""
    cols: dict[str, pa.Array] = {}
    for name, v in rows.items():
        if name.startswith("_") or name.endswith("_observed"):
            continue
        if name in ("conversion", "ad_click"):
            cols[name] = pa.array(v.astype(np.int8), mask=~rows[f"{name}_observed"])
        elif v.dtype == bool:
            cols[name] = pa.array(v.astype(np.int8))
        elif v.dtype == object or v.dtype.kind == "U":
            cols[name] = pa.array(v.astype(object), pa.string())
        else:
            cols[name] = pa.array(v)
    return pa.table(cols)


def split_of(cfg: WorldConfig, day: np.ndarray) -> np.ndarray:
    """0 = train, 1 = valid, 2 = test, by day (a time-based split, as in production)."""
    return (day >= cfg.split_days[0]).astype(int) + (day >= cfg.split_days[1]).astype(int)


def generate(cfg: WorldConfig, out_dir: str | Path, progress: bool = False) -> dict:
    """Write train/valid/test Parquet files chunk by chunk (constant memory); return diagnostics."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = build_world(cfg)
    writers: dict[str, pq.ParquetWriter] = {}
    stats = _Stats(cfg)
    n_chunks = math.ceil(cfg.rows / cfg.chunk_rows)
    try:
        for c in range(n_chunks):
            n = min(cfg.chunk_rows, cfg.rows - c * cfg.chunk_rows)
            rows = impressions(world, n, c)
            stats.add(rows)
            table = to_table(rows)
            split = split_of(cfg, rows["day"])
            for k, name in enumerate(SPLITS):
                part = table.filter(pa.array(split == k))
                if name not in writers:
                    writers[name] = pq.ParquetWriter(out / f"{name}.parquet", part.schema)
                writers[name].write_table(part)
            if progress:
                print(f"  synth: chunk {c + 1}/{n_chunks} ({(c + 1) * cfg.chunk_rows:,} rows)")
    finally:
        for wr in writers.values():
            wr.close()
    items = pa.table(
        {
            "item_id": np.arange(cfg.n_items),
            "title": item_titles(world),
            "leaf_category": world.leaf,
            "top_category": world.top,
            "brand": world.brand,
            "is_new_item": world.is_new.astype(np.int8),
            "image": pa.array([im.tobytes() for im in item_images(world)], pa.binary()),
        }
    )
    pq.write_table(items, out / "items.parquet")
    diag = stats.summary()
    (out / "world.json").write_text(json.dumps({"config": _cfg_dict(cfg), **diag}, indent=2))
    return diag


def _cfg_dict(cfg: WorldConfig) -> dict:
    from shopmtl.config import to_dict

    return to_dict(cfg)


class _Stats:
    """Running label rates and the click-logit variance decomposition."""

    def __init__(self, cfg: WorldConfig) -> None:
        self.cfg = cfg
        self.sums: dict[str, float] = {}
        self.parts: dict[str, list[np.ndarray]] = {"_observable": [], "_latent": [], "_z": []}

    def _add(self, key: str, v: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + v

    def add(self, rows: dict[str, np.ndarray]) -> None:
        for s in self.cfg.scenarios:
            m = rows["scenario"] == s
            self._add(f"{s}.n", m.sum())
            self._add(f"{s}.click", rows["click"][m].sum())
            self._add(f"{s}.conversion", rows["conversion"][m].sum())
            self._add(f"{s}.ad_click", (rows["ad_click"] & rows["ad_click_observed"])[m].sum())
        self._add("rows", len(rows["click"]))
        for key in self.parts:
            if sum(len(p) for p in self.parts[key]) < 200_000:
                self.parts[key].append(rows[key][:50_000])

    def summary(self) -> dict:
        g = self.sums
        rates = {}
        for s in self.cfg.scenarios:
            n = max(g[f"{s}.n"], 1)
            rates[s] = {
                "share": g[f"{s}.n"] / g["rows"],
                "click_rate": g[f"{s}.click"] / n,
                "conversion_per_click": g[f"{s}.conversion"] / max(g[f"{s}.click"], 1),
                "ad_click_rate": g[f"{s}.ad_click"] / n if s == "ad_slot" else None,
            }
        z = {k: np.concatenate(v) for k, v in self.parts.items()}
        var_z = float(z["_z"].var())
        return {
            "rows": int(g["rows"]),
            "scenarios": rates,
            "click_logit_variance": var_z,
            "latent_variance_share": float(z["_latent"].var() / var_z),
            "observable_variance_share": float(z["_observable"].var() / var_z),
        }
