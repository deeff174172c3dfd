"""DVC stage `train@<head>`: seeded stratified k-fold training of one head on cached features."""
from features.errors import ConfigError
from models.training.train_config import train_config
from models.training.stage import log_training, train_head
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("head", help="name under train.heads in params.yaml")
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", required=True, help="folder of embedding stores (one folder per encoder)")
    p.add_argument("--out", required=True, help="output folder for this head")
    p.add_argument("--probe", default="artifacts/probe",
                   help="folder of probe outputs (read for `layer: best`)")
    p.add_argument("--live", default="", help="dvclive folder: loss curves and metrics")
    args = p.parse_args(argv)
    setup()
    cfg = train_config(load_params("train", args.params))
    if args.head not in cfg.heads:
        raise ConfigError(f"head {args.head!r} is not under train.heads; known: {sorted(cfg.heads)}.")
    out = train_head(args.head, cfg.heads[args.head], cfg, args.manifest, args.features, args.out,
                     probe_dir=args.probe)
    if args.live:
        log_training(out, args.live)


if __name__ == "__main__":
    run(main)
