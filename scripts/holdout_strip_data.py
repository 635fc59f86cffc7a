"""The embedded default set with held-out training images of pixels no trained image shows.

    python scripts/holdout_strip_data.py OUT [--data-seed 0] [--size 128]
    snl compare --data OUT ...

The embedded set cuts every training crop at a random place of the top band of its
photograph, so the images ``snl train`` holds out for the self-check overlap the ones it
trains on: their pixels are mostly familiar, unlike a user's held-out photographs. This
script writes the default set (same parameters, same test images) with the training crops
moved apart: per class, the files ``snl train`` will hold out (``snl.data.split_holdout``,
minimum 8) are cut from the last ``crop`` rows of the training band, every other training
crop from the rows above them. No trained pixel is in a held-out image; the test crops are
the default set's, from the bottom band. ``holdout_strip.json`` records every training
crop's box and whether it is held out; ``dataset.json``'s boxes are the new ones too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from snl.data import split_holdout, textures
from snl.data.holdout import HOLDOUT_MIN


def build(out: Path, data_seed: int = 0, size: int = 128, **counts: int) -> dict:
    """Write the set under ``out`` (replaced if it exists); returns the boxes' record."""
    if out.exists():
        shutil.rmtree(out)
    textures.make_default_dataset(out, seed=data_seed, size=size, **counts)
    params = textures.read_manifest(out / "dataset.json", "snl.data.textures")["params"]
    crop = params["crop"]
    held = split_holdout(out, "all", HOLDOUT_MIN)
    record = {}
    for ci, name in enumerate(params["classes"]):
        photo = textures._photo(name)
        (top, split), _ = textures._bands(photo.shape[0], crop)
        if split - top < 2 * crop:
            raise SystemExit(f"{name}: the training band ({split - top} rows) cannot hold two "
                             f"disjoint strips of {crop} rows")
        strips = {True: (split - crop, split), False: (top, split - crop)}
        chosen = set(held.held[name])
        for i, path in enumerate(sorted((out / name / "train" / "good").glob("*.png"))):
            rng = np.random.default_rng([params["seed"], ci, 0, i, 99])  # 99: not the set's stream
            image, box = textures._cut(photo, strips[path in chosen], crop, size, rng)
            textures._save_png(image, path)
            record[path.relative_to(out).as_posix()] = {"box": box,
                                                        "held_out": path in chosen}
    manifest = json.loads((out / "dataset.json").read_text())
    for key, value in record.items():  # the boxes the training crops now come from
        name, rel = key.split("/", 1)
        manifest["boxes"][name][rel] = value["box"]
    (out / "dataset.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
    with open(out / "holdout_strip.json", "w") as f:
        json.dump({"what": __doc__.split("\n\n")[0], "params": params, "boxes": record}, f,
                  indent=1)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    record = build(args.out, args.data_seed, args.size)
    held = sum(r["held_out"] for r in record.values())
    print(f"{args.out}: {len(record)} training images, {held} of them held out, from rows no "
          "trained image covers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
