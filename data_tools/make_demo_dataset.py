"""CLI of the synthetic demo dataset (sdxl_jax/data/demo.py): flat shapes on flat backgrounds.

    python -m data_tools.make_demo_dataset --out DIR [--n 256] [--seed 0] [--side 256]

The generator itself (and the known colours of every image) lives in sdxl_jax.data.demo.
"""
from __future__ import annotations

import sys

from sdxl_jax import cli
from sdxl_jax.data.demo import make_demo_dataset, make_example  # noqa: F401  (re-exported)


@cli.entry_point  # user errors: one line `error: …`; --debug shows the traceback
def main(argv=None) -> int:
    ap = cli.ArgumentParser(prog="python -m data_tools.make_demo_dataset",
                            description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder to write images and captions into")
    ap.add_argument("--n", type=int, default=256, help="number of images (at least 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--side", type=int, default=256, help="images have an area of about side² "
                    "(at least 16)")
    args = ap.parse_args(argv)
    cli.check(args.n >= 1, f"--n {args.n}: the dataset needs at least 1 image")
    cli.check(args.side >= 16, f"--side {args.side}: images need an area of at least 16²")
    files = make_demo_dataset(args.out, args.n, args.seed, args.side)
    print(f"wrote {len(files)} captioned images to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
