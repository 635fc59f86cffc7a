"""How sharply a trained SNL model's CRAM assigns positions to its centres (docs/model.md §1).

For each checkpoint, and for the good test images, each defect type and each probe kind of
one class (8 images each), prints the temperature tau, the mean entropy of the soft
assignment over the K centres (log K: uniform, 0: one-hot), the mean largest assignment
weight, and the mean and the spread over the centres (standard deviation) of the squared
distances ``|e - c_k|^2`` that tau divides.

    python scripts/cram_assignments.py RUN/checkpoints/last.pt [...] [--class brick]
        [--data DIR] [--probes DIR] [--images 8]

``--data`` defaults to the embedded default set the checkpoint was trained on (data seed 0)
and ``--probes`` to none (``snl compare`` writes them under its folder's ``probes/``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch


def assignment_stats(model, images: torch.Tensor) -> dict[str, float]:
    """CRAM's assignment of ``images`` (B, 3, H, W, normalised) by ``model`` (an ``snl.SNL``
    of structure "snl", in eval mode): tau, mean entropy, mean largest weight, and the mean
    and the mean standard deviation over the centres of the squared distances."""
    if model.cram is None:
        raise ValueError("the model has no CRAM (structure 'rd')")
    with torch.no_grad():
        embedding = model.ocbe(model.teacher(images))
        out = model.cram(embedding)[1]
        e = embedding.permute(0, 2, 3, 1).reshape(-1, embedding.shape[1]).double()
        dist = torch.cdist(e, model.cram.centers.double()) ** 2
    a = out.assign.double()
    entropy = -(a * a.clamp_min(1e-30).log()).sum(1)
    return {"tau": model.cram.log_tau.exp().item(), "entropy": entropy.mean().item(),
            "uniform_entropy": math.log(a.shape[1]), "top_weight": a.amax(1).mean().item(),
            "dist_mean": dist.mean().item(), "dist_std_over_centres": dist.std(1).mean().item()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--class", dest="class_name", default="brick")
    p.add_argument("--data", type=Path, help="data set folder (default: the embedded set)")
    p.add_argument("--probes", type=Path, help="probe folder of an snl compare run")
    p.add_argument("--images", type=int, default=8, help="images per kind (default 8)")
    args = p.parse_args()
    if args.images < 1:
        p.error(f"--images must be at least 1, got {args.images}")
    from snl.cli.prediction import load_run
    from snl.cli.training import default_data_root
    from snl.data import TestDataset

    data = args.data or default_data_root(0)
    for path in args.checkpoints:
        if not path.is_file():
            p.error(f"no checkpoint file {path}")
        model, config, _ = load_run(path, "cpu")
        model.eval()
        norm = model.normalization
        print(path)
        for root in [data] + ([args.probes] if args.probes else []):
            ds = TestDataset(root, args.class_name, size=config.image_size, mean=norm.mean,
                             std=norm.std)
            kinds = sorted({s.defect for s in ds.samples})
            if root != data:
                kinds = [k for k in kinds if k != "good"]
            for kind in kinds:
                idx = [i for i, s in enumerate(ds.samples) if s.defect == kind][:args.images]
                stats = assignment_stats(model, torch.stack([ds[i]["image"] for i in idx]))
                print(f"  {kind:9s} tau {stats['tau']:7.2f}  entropy {stats['entropy']:.3f} "
                      f"of {stats['uniform_entropy']:.3f}  top weight {stats['top_weight']:.3f}"
                      f"  |e - c|^2 {stats['dist_mean']:8.2f}, std over centres "
                      f"{stats['dist_std_over_centres']:7.2f}")


if __name__ == "__main__":
    main()
