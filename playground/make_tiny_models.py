"""Write the demo's tiny real models (vision tower + Llama LM with a tokenizer trained on the data) to disk.

Run:  python playground/make_tiny_models.py --data playground/data/shapes --workdir playground
      (writes playground/models/tiny-clip-vision and playground/models/tiny-llama; run make_demo_data.py first)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llava.demo.tiny_models import write_demo_models


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="playground/data/shapes", help="folder holding the LLaVA JSON files")
    parser.add_argument("--workdir", default="playground", help="models are written under WORKDIR/models/")
    parser.add_argument("--vision-kind", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    data_files = sorted(Path(args.data).glob("*.json")) + sorted(Path(args.data).glob("*.jsonl"))
    if not data_files:
        parser.error(f"no *.json / *.jsonl files in {args.data}: run playground/make_demo_data.py first")
    paths = write_demo_models(
        args.workdir, data_files, vision_kind=args.vision_kind, image_size=args.image_size, seed=args.seed
    )
    for name, path in paths.items():
        print(f"  {name:13s} {path}")


if __name__ == "__main__":
    main()
