"""Write the tiny video demo data (a dot moving left or right, and images).

Run:  python playground/make_demo_videos.py --out playground/data/dots
      (writes videos/*.mp4, videos/frames_v1/*.png, images/*.png and train.json under --out)
"""

from __future__ import annotations

import argparse

from llava.demo.moving_dots import write_video_corpus


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="playground/data/dots", help="output folder")
    # 12 video records and 4 image records: whole steps of one modality for --group_by_modality_length at
    # 2 processes x batch 2 (under ZeRO-3 every rank of a step must run the same tower path)
    parser.add_argument("--n-videos", type=int, default=12)
    parser.add_argument("--n-images", type=int, default=4)
    args = parser.parse_args(argv)
    paths = write_video_corpus(args.out, n_videos=args.n_videos, n_images=args.n_images, text=False, mix=False)
    for name in ("train", "video_folder", "image_folder"):
        print(f"  {name:13s} {paths[name]}")


if __name__ == "__main__":
    main()
