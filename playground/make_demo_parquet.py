"""Write LLaVA JSON records as Parquet with the images embedded (LLaVA-OneVision-Data's layout), for the mixture demo.

    python playground/make_demo_parquet.py      # the demo's shapes Q&A (make_demo_data.py's output under data/shapes)

Columns as LLaVA-OneVision-Data has them: ``id``, ``image`` (``{"bytes", "path"}``, null for text-only records) and
``conversations``; ``llava train --data_path`` reads the file in place and decodes each image when its sample is drawn.
``playground/mixture.yaml`` lists it beside the JSON files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def write_embedded_parquet(data: str | Path, image_folder: str | Path, out: str | Path) -> Path:
    """The records of ``data`` (single-image or text-only) with each image's file bytes in the ``image`` column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for record in json.loads(Path(data).read_text()):
        image = record.get("image")
        rows.append({"id": str(record["id"]), "conversations": record["conversations"],
                     "image": None if image is None else {"bytes": (Path(image_folder) / image).read_bytes(),
                                                          "path": image}})
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    conv = pa.list_(pa.struct([("from", pa.string()), ("value", pa.string())]))
    schema = pa.schema([("id", pa.string()), ("image", struct), ("conversations", conv)])
    out = Path(out)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), out, row_group_size=256)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shapes = Path(__file__).resolve().parent / "data" / "shapes"
    p.add_argument("--data", default=str(shapes / "stage2_qa.json"))
    p.add_argument("--image_folder", default=str(shapes))
    p.add_argument("--out", default=str(shapes / "stage2_qa_embedded.parquet"), help="the file mixture.yaml lists")
    args = p.parse_args()
    print(write_embedded_parquet(args.data, args.image_folder, args.out))


if __name__ == "__main__":
    main()
