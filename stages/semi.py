"""DVC stages `semi_base` and `semi@<round>`: pseudo-label self-training rounds (models/unlabelled/rounds.py)."""
from models.training.train_config import train_config
from models.unlabelled.rounds import BASE, run_round, semi_config
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("round", help=f"'{BASE}' or a name under semi.rounds in params.yaml")
    p.add_argument("--after", default="", help="output folder of the round this one follows")
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", required=True, help="folder of embedding stores")
    p.add_argument("--probe", required=True, help="folder of probe outputs (`layer: best`)")
    p.add_argument("--out", required=True, help="output folder of this round")
    args = p.parse_args(argv)
    setup()
    cfg = semi_config(load_params("semi", args.params))
    train_cfg = train_config(load_params("train", args.params))
    unlabelled = load_params("prepare", args.params).get("unlabelled", "")
    info = run_round(args.round, cfg, train_cfg, args.manifest, args.features, args.probe,
                     args.out, args.after or None, unlabelled)
    if not info["metrics"]:
        return  # nothing to do: run_round said so in one line
    scores = ", ".join(f"{h} {m['weighted_f1']:.4f}" for h, m in info["metrics"].items())
    print(f"[semi {args.round}] {info['mode']}; gained per class (mean over folds) "
          f"{info['gain']}; out-of-fold weighted F1 on human labels: {scores}")


if __name__ == "__main__":
    run(main)
