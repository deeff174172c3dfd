"""DVC stage `train@<head>`: seeded stratified k-fold training of one head on cached features."""
from models.config import train_config
from models.run import train_head
from stages.common import load_params, parser, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("head", help="name under train.heads in params.yaml")
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", required=True, help="folder of embedding stores (one folder per encoder)")
    p.add_argument("--out", required=True, help="output folder for this head")
    args = p.parse_args(argv)
    setup()
    cfg = train_config(load_params("train", args.params))
    if args.head not in cfg.heads:
        from features.errors import ConfigError
        raise ConfigError(f"head {args.head!r} is not under train.heads; known: {sorted(cfg.heads)}.")
    train_head(args.head, cfg.heads[args.head], cfg, args.manifest, args.features, args.out)


if __name__ == "__main__":
    main()
