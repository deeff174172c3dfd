"""DVC stage `embed@<encoder>`: one encoder over its input, every layer, into one HDF5 store."""
from features.config import from_section
from features.embed import embed_store
from features.encoders import EncoderConfig
from stages.common import load_params, parser, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("encoder", help="name under embed.encoders in params.yaml")
    p.add_argument("--out", required=True, help="output store folder")
    args = p.parse_args(argv)
    setup()
    where = f"embed.encoders.{args.encoder}"
    cfg = from_section(EncoderConfig, load_params(where, args.params), where)
    embed_store(args.encoder, cfg, cfg.input, args.out)


if __name__ == "__main__":
    main()
