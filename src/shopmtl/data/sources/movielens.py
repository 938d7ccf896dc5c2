"""MovieLens ``ml-latest-small`` as a multi-scenario, multi-task table (one Parquet file).

``ratings.csv`` is joined with ``movies.csv``; each rating becomes one row::

    userId, movieId      ids (categorical features; userId is also the GAUC group)
    genre_group          the scenario: the movie's first listed genre, grouped (GENRE_GROUPS)
    genres               all genres, '|'-joined (a sequence feature)
    hour, weekday        when the rating was given (UTC hour 0-23, ISO weekday 1=Mon..7=Sun)
    movie_age            rating year - release year from the title (null when the title has none)
    rating               0.5..5.0; the labels come from it with ``threshold`` in the config:
                         like = rating >= 4, love = rating >= 4.5 (both exist on every row)
    timestamp            Unix seconds, kept for time-based splits

MovieLens lists a movie's genres in alphabetical order, so the "first genre" is the
alphabetically first one (Toy Story: Adventure). The four groups keep that rule and merge the
small genres into the closest large one; ratings per group: action 37,610 · comedy 30,316 ·
drama 21,038 · thriller 11,040. The 18 ratings of movies with "(no genres listed)" go to drama.

Run ``python -m shopmtl.data.sources.movielens OUT_DIR [--root RAW_DIR]`` to write
``OUT_DIR/movielens_latest_small.parquet``. The data is GroupLens-licensed (research only, no
commercial use); keep ``README_movielens.txt`` next to anything you redistribute.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from shopmtl.data.sources import DATASETS_ROOT

FILE_NAME = "movielens_latest_small.parquet"

# first listed genre -> scenario
GENRE_GROUPS: dict[str, str] = {
    "Action": "action",
    "Adventure": "action",
    "Sci-Fi": "action",
    "Fantasy": "action",
    "Western": "action",
    "War": "action",
    "IMAX": "action",
    "Comedy": "comedy",
    "Animation": "comedy",
    "Children": "comedy",
    "Musical": "comedy",
    "Romance": "comedy",
    "Drama": "drama",
    "Documentary": "drama",
    "(no genres listed)": "drama",
    "Crime": "thriller",
    "Horror": "thriller",
    "Mystery": "thriller",
    "Thriller": "thriller",
    "Film-Noir": "thriller",
}
SCENARIOS = ("action", "comedy", "drama", "thriller")  # the order used in the example config
DEFAULT_GROUP = "drama"  # a genre not in GENRE_GROUPS (none in the 2016 release)


def _read(path: Path, types: dict[str, pa.DataType]) -> pa.Table:
    if not path.is_file():
        raise FileNotFoundError(f"MovieLens file not found: {path}")
    return pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(column_types=types))


def prepare_movielens(root: Path, out_dir: Path) -> Path:
    """Join ``root``'s ratings with its movies; write and return ``out_dir/FILE_NAME``."""
    root, out_dir = Path(root), Path(out_dir)
    ratings = _read(
        root / "ratings.csv",
        {
            "userId": pa.int64(),
            "movieId": pa.int64(),
            "rating": pa.float64(),
            "timestamp": pa.int64(),
        },
    )
    movies = _read(
        root / "movies.csv", {"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()}
    )

    # per movie: scenario and release year (9k rows: plain Python is clear and fast enough)
    first = [g.split("|")[0] for g in movies.column("genres").to_pylist()]
    group = [GENRE_GROUPS.get(g, DEFAULT_GROUP) for g in first]
    year = pc.struct_field(
        pc.extract_regex(pc.utf8_trim_whitespace(movies.column("title")), r"\((?P<y>\d{4})\)$"),
        [0],
    )
    movies = pa.table(
        {
            "movieId": movies.column("movieId"),
            "genre_group": pa.array(group, pa.string()),
            "genres": movies.column("genres"),
            "release_year": pc.cast(year, pa.int64()),
        }
    )

    ratings = ratings.append_column("_row", pa.array(np.arange(ratings.num_rows)))
    joined = ratings.join(movies, "movieId", join_type="left outer").sort_by("_row")
    missing = joined.column("genre_group").null_count
    if missing:
        raise ValueError(f"{missing} ratings refer to movies not in movies.csv")

    ts = pc.cast(joined.column("timestamp"), pa.timestamp("s", tz="UTC"))
    age = pc.subtract(pc.year(ts), joined.column("release_year"))
    table = pa.table(
        {
            "userId": joined.column("userId"),
            "movieId": joined.column("movieId"),
            "genre_group": joined.column("genre_group"),
            "genres": joined.column("genres"),
            "hour": pc.cast(pc.hour(ts), pa.int64()),
            "weekday": pc.cast(pc.day_of_week(ts, count_from_zero=False), pa.int64()),
            "movie_age": pc.cast(age, pa.float64()),
            "rating": joined.column("rating"),
            "timestamp": joined.column("timestamp"),
        }
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / FILE_NAME
    tmp = out.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)  # a reader never sees half a file
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m shopmtl.data.sources.movielens", description=__doc__.split("\n")[0]
    )
    parser.add_argument("out_dir", type=Path, help=f"where to write {FILE_NAME}")
    parser.add_argument(
        "--root",
        type=Path,
        default=DATASETS_ROOT / "movielens_latest_small",
        help="folder with ratings.csv and movies.csv (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    print(prepare_movielens(args.root, args.out_dir))


if __name__ == "__main__":
    main()
