"""DVC stage `embed@<encoder>`: one encoder over its input, every layer, into one HDF5 store.

`--nproc N` (or MER_EMBED_NPROC=N, e.g. `MER_EMBED_NPROC=8 dvc repro embed@hubert`) relaunches
this stage under torchrun with N ranks on this node (one GPU each); launched by torchrun
directly (several nodes, SLURM) it runs as one rank. See docs/scaling.md.
"""
import os
import subprocess
import sys

from features.params import from_section
from features.embedding.stage import embed_store
from features.encoders import EncoderConfig
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("encoder", help="name under embed.encoders in params.yaml")
    p.add_argument("--out", required=True, help="output store folder")
    p.add_argument("--nproc", type=int, default=int(os.environ.get("MER_EMBED_NPROC", "1")),
                   help="ranks on this node (relaunches under torchrun); default 1")
    p.add_argument("--workers", type=int, default=None,
                   help="loader processes per rank (default: 0 on CPU, up to 8 on a GPU)")
    args = p.parse_args(argv)
    setup()
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        sys.exit(_torchrun(args.nproc, sys.argv[1:] if argv is None else argv))
    where = f"embed.encoders.{args.encoder}"
    cfg = from_section(EncoderConfig, load_params(where, args.params), where)
    embed_store(args.encoder, cfg, cfg.input, args.out, workers=args.workers)


def _torchrun(nproc: int, argv: list[str]) -> int:
    """Run this same command as `nproc` ranks; the ranks see WORLD_SIZE and do not relaunch."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "stages.embed", *argv]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    run(main)
