"""DVC stage `standins`: the demo's random-weight HuBERT and CLIP stand-ins, built from their
configs with a fixed seed (no hub access needed). A stage, so `dvc pull` brings them to a
teammate and `dvc repro` never needs a step outside DVC."""
from features.encoders.standins import StandinsConfig, build_standins
from features.params import from_section
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("out_dir", nargs="?", default="artifacts/standins", help="output folder")
    args = p.parse_args(argv)
    setup()
    cfg = from_section(StandinsConfig, load_params("standins", args.params), "standins")
    for name, path in build_standins(args.out_dir, seed=cfg.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    run(main)
