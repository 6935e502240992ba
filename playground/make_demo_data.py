"""Draw the synthetic shapes dataset (the demo's embedded default) in LLaVA JSON format.

Run:  python playground/make_demo_data.py --out playground/data/shapes
      (writes images/*.png, stage1_captions.json, stage2_qa.json, heldout_qa.json under --out)
"""

from __future__ import annotations

import argparse
import time

from llava.demo.shapes import generate_shapes_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="playground/data/shapes", help="output folder (also the --image_folder)")
    parser.add_argument("--n-caption", type=int, default=1000, help="stage-1 caption records (one image each)")
    parser.add_argument("--n-qa", type=int, default=2000, help="stage-2 multi-turn Q&A records (~5%% text-only)")
    parser.add_argument("--n-heldout", type=int, default=400, help="held-out single-question records")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    paths = generate_shapes_dataset(
        args.out,
        n_caption=args.n_caption,
        n_qa=args.n_qa,
        n_heldout=args.n_heldout,
        image_size=args.image_size,
        seed=args.seed,
    )
    print(f"wrote the shapes dataset in {time.perf_counter() - start:.1f} s:")
    for name, path in paths.items():
        print(f"  {name:16s} {path}")


if __name__ == "__main__":
    main()
