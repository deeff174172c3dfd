"""DVC stage `adapt@<name>`: LoRA on an encoder's top layers from its cached prefix frames (models/adapt/lora.py)."""
from features.params import from_section
from features.encoders import EncoderConfig
from models.adapt.lora import AdaptConfig
from models.adapt.lora_stage import adapt_store
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("name", help="name under adapt in params.yaml (also the output store's name)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", required=True, help="folder of feature stores (reads <encoder>)")
    p.add_argument("--probe", required=True, help="folder of probe outputs (layers: best)")
    p.add_argument("--out", required=True, help="folder for report.json and trained/ (the saved fold models)")
    p.add_argument("--store", default=None, help="output store (default: <features>/<name>)")
    args = p.parse_args(argv)
    setup()
    cfg = from_section(AdaptConfig, load_params(f"adapt.{args.name}", args.params), f"adapt.{args.name}")
    where = f"embed.encoders.{cfg.encoder}"
    enc_cfg = from_section(EncoderConfig, load_params(where, args.params), where)
    adapt_store(args.name, cfg, enc_cfg, args.manifest, args.features, args.probe, args.out, args.store)


if __name__ == "__main__":
    run(main)
