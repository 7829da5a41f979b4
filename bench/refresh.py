"""A refresh after 1% new reports, next to the full run, on the world-spread input (issue 15's target: <= 10%).

The input: 1M world-spread road reports (the ``snapshot`` bench's ``world``
input, generic profile) as ten Parquet files of a file source, the tileset's
``as_of`` pinned so that only the reports change. Measured, each ``hotspots
run`` in its own process:

* the full run, into a fresh home and output;
* the refresh: an eleventh file of 10,000 new reports (1%), the same command
  again. Extraction reads and checks only the new file; the build takes the selection
  of tiles whose cells did not change, and the MVT tiles whose rows did not
  change, from the last build (laying out only the rows of tiles near a changed
  one), and does the rest again;
* a from-scratch run over the eleven files, whose snapshot must be the
  refresh's, byte for byte (the same content-hash name).
"""

from __future__ import annotations

import json
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from .snapshot import measure

ROWS, FILES, NEW = 1_000_000, 10, 10_000
AS_OF = datetime(2026, 11, 1, tzinfo=UTC)
TARGET = 0.10  # the refresh's wall time over the full run's


def write_reports(folder: Path, name: str, count: int, seed: int) -> None:
    """``count`` (at most ``BATCH_ROWS``) world-spread road reports, the synthetic source's text columns,
    into ``folder/name``."""
    from pipeline.config import SyntheticSource
    from pipeline.sources.synthetic import batches

    src = SyntheticSource(kind="synthetic", domain="road_conditions", count=count, seed=seed, days=60, spread="world")
    [(_, table)] = batches(src, AS_OF)  # one batch: count <= BATCH_ROWS
    # ids unique across files (each file's generator numbers its rows from 0)
    ids = pc.binary_join_element_wise(pa.scalar(f"{name}:"), table.column("report_id"), "")
    pq.write_table(table.set_column(table.schema.get_field_index("report_id"), "report_id", ids), folder / name)


def config(root: Path, data: Path, columns: list[str]) -> Path:
    cfg = {
        "output": str(root / "output"),
        "home": str(root / ".hotspots"),
        "roots": [str(root)],
        "sources": {
            "world": {
                "kind": "file",
                "path": str(data / "*.parquet"),
                "format": "parquet",
                "columns": {c: c for c in columns if c != "source"},
            }
        },
        "tilesets": {"world": {"source": "world", "profile": "generic", "as_of": AS_OF.isoformat()}},
    }
    path = root / "hotspots.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def latest(config_path: Path) -> str:
    from pipeline.config import load_config

    cfg = load_config(config_path)
    return json.loads(cfg.published("world").latest.read_text())["snapshot_id"]


def reuse(config_path: Path) -> dict:
    """What the last build took from the one before: MVT tiles (and how many it encoded), tiles' selections."""
    from pipeline.config import load_config
    from pipeline.publish import read_selection

    work = load_config(config_path).work("world")
    zooms = read_selection(work)
    return {
        **json.loads(work.staged.read_text())["mvt"],
        "selections": sum(z["reused"] for z in zooms),
        "tiles": sum(z["tiles"] for z in zooms),
    }


def main(rows: int = ROWS) -> bool:
    from pipeline.schema import MAPPABLE

    hotspots = str(Path(sys.executable).parent / "hotspots")
    with tempfile.TemporaryDirectory(prefix="hotspots-bench-refresh-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        for i in range(FILES):
            write_reports(data, f"part-{i:02d}.parquet", rows // FILES, seed=100 + i)
        columns = [c for c in pq.read_schema(data / "part-00.parquet").names if c in MAPPABLE]
        live = config(Path(tmp) / "live", data, columns)
        full = measure([hotspots, "run", "--config", str(live)])
        write_reports(data, "part-new.parquet", rows // 100, seed=999)
        refresh = measure([hotspots, "run", "--config", str(live)])
        kept = reuse(live)
        scratch = config(Path(tmp) / "scratch", data, columns)
        again = measure([hotspots, "run", "--config", str(scratch)])
        same = latest(live) == latest(scratch)
    ratio = refresh.wall / full.wall
    ok = ratio <= TARGET and same
    print(f"refresh: {rows:,} world-spread reports in {FILES} Parquet files, generic profile, z0-z14, as_of pinned")
    print(f"  full run                    : {full.wall:7.2f} s  (peak RSS {full.rss / 1e9:.2f} GB)")
    print(
        f"  refresh after {rows // 100:,} new (1%): {refresh.wall:7.2f} s  (peak RSS {refresh.rss / 1e9:.2f} GB; "
        f"ratio {ratio:.2f}, target <= {TARGET:.2f})"
    )
    print(
        f"    extraction read the new file only; of {kept['tiles']:,} tiles, {kept['selections']:,} kept their "
        f"selection; MVT tiles encoded {kept['encoded']:,}, from the tile cache {kept['reused']:,} (rows laid out "
        f"and compared: {kept['compared']:,})"
    )
    print(f"  from scratch, same files    : {again.wall:7.2f} s  ({'the same' if same else 'NOT the same'} snapshot)")
    print(f"  {'PASS' if ok else 'FAIL'}")
    return ok


if __name__ == "__main__":
    sys.exit(0 if main(int(sys.argv[1]) if len(sys.argv) > 1 else ROWS) else 1)
