"""DVC stage `ensemble@<name>`: soft voting, OOF-tuned weighted voting or stacking over heads."""
from features.params import from_section
from features.errors import ConfigError
from models.ensemble import EnsembleConfig, run_ensemble
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("name", help="name under ensemble in params.yaml")
    p.add_argument("--heads", required=True, help="folder of trained heads")
    p.add_argument("--out", required=True, help="output folder for this ensemble")
    args = p.parse_args(argv)
    setup()
    section = load_params("ensemble", args.params) or {}
    if args.name not in section:
        raise ConfigError(f"ensemble {args.name!r} is not under ensemble; known: {sorted(section)}.")
    cfg = from_section(EnsembleConfig, section[args.name], f"ensemble.{args.name}")
    info = run_ensemble(args.name, cfg, args.heads, args.out)
    extra = {k: info[k] for k in ("weights", "oof_tuned_weighted_f1", "nested_weighted_f1") if k in info}
    print(f"[ensemble {args.name}] {cfg.method} over {cfg.heads}: weighted F1 "
          f"{info['weighted_f1']:.4f} (out-of-fold) {extra or ''}")


if __name__ == "__main__":
    run(main)
