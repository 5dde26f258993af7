"""Fills launch/gke/jobset.yaml.tmpl for a TPU slice shape and an experiment config.

    python -m launch.gke.fill --name gopher-7b --accelerator v5p --topology 4x4x8 \
        --num_slices 2 --image REGION-docker.pkg.dev/PROJECT/REPO/gopher_jax:TAG \
        --config experiments/gopher_7_1b.py --workdir gs://BUCKET/runs/7b \
        --bucket BUCKET --data_dir /mnt/BUCKET/data > jobset.yaml
    kubectl apply -f jobset.yaml
"""

from __future__ import annotations

import argparse
import math
import pathlib
import string
import sys
from collections.abc import Sequence

from gopher_jax.hardware import TPU_GENERATIONS, TpuGeneration
from launch.tpu_vm import slice_flags

TEMPLATE = pathlib.Path(__file__).with_name("jobset.yaml.tmpl")
# The generations that GKE has TPU node pools for.
GKE: dict[str, TpuGeneration] = {name: g for name, g in TPU_GENERATIONS.items()
                                 if g.gke_accelerator}


POD_METADATA = """\
            metadata:
              annotations:
                gke-gcsfuse/volumes: "true"
"""
BUCKET_VOLUME = """\
                  volumeMounts:
                    - name: bucket
                      mountPath: /mnt/{bucket}
              volumes:
                - name: bucket
                  csi:
                    driver: gcsfuse.csi.storage.gke.io
                    volumeAttributes:
                      bucketName: {bucket}
                      mountOptions: implicit-dirs
                      hostNetworkPodKSA: "true"
"""


def fill(name: str, accelerator: str, topology: str, num_slices: int, image: str, config: str,
         workdir: str, data_dir: str = "", extra_args: Sequence[str] = (),
         max_restarts: int = 0, bucket: str = "") -> str:
    """The manifest text. Raises ValueError naming the bad argument."""
    if bucket.startswith("gs://") or "/" in bucket:
        raise ValueError(f"--bucket={bucket!r}: give the bare bucket name, e.g. my-bucket")
    if accelerator not in GKE:
        raise ValueError(f"--accelerator={accelerator!r}: GKE TPU node pools here are "
                         f"{sorted(GKE)}")
    gen = GKE[accelerator]
    label, chips_per_host, ndim = gen.gke_accelerator, gen.chips_per_host, gen.torus_dims
    try:
        dims = [int(x) for x in topology.split("x")]
    except ValueError:
        dims = []
    if len(dims) != ndim or min(dims, default=0) < 1:
        raise ValueError(f"--topology={topology!r}: {accelerator} wants {ndim} dimensions, "
                         f"e.g. {'x'.join(['4'] * ndim)}")
    chips = math.prod(dims)
    per_host = min(chips, chips_per_host)
    if chips % per_host:
        raise ValueError(f"--topology={topology}: {chips} chips is not a whole number of "
                         f"{per_host}-chip hosts")
    if num_slices < 1:
        raise ValueError("--num_slices must be >= 1")
    values = dict(
        NAME=name, NUM_SLICES=num_slices, HOSTS_PER_SLICE=chips // per_host,
        CHIPS_PER_HOST=per_host, GKE_ACCELERATOR=label, TOPOLOGY=topology, IMAGE=image,
        CONFIG=config, WORKDIR=workdir, DATA_DIR=data_dir,
        EXTRA_ARGS=" ".join([*extra_args, *slice_flags(num_slices, extra_args)]),
        MAX_RESTARTS=max_restarts, POD_METADATA=POD_METADATA if bucket else "",
        BUCKET_VOLUME=BUCKET_VOLUME.format(bucket=bucket) if bucket else "")
    return string.Template(TEMPLATE.read_text()).substitute(values)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--accelerator", required=True, choices=sorted(GKE))
    ap.add_argument("--topology", required=True, help="chips per slice, e.g. 4x4x8 or 16x16")
    ap.add_argument("--num_slices", type=int, default=1)
    ap.add_argument("--image", required=True, help="a container with `pip install .[tpu]`")
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--data_dir", default="")
    ap.add_argument("--max_restarts", type=int, default=0)
    ap.add_argument("--bucket", default="",
                    help="mount this Cloud Storage bucket at /mnt/BUCKET (gcsfuse CSI driver)")
    ap.add_argument("extra", nargs="*", help="more flags for train, after --")
    a = ap.parse_args(argv)
    try:
        print(fill(a.name, a.accelerator, a.topology, a.num_slices, a.image, a.config,
                   a.workdir, a.data_dir, a.extra, a.max_restarts, a.bucket), end="")
    except ValueError as e:
        print(f"fill.py: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
