"""DVC stage `evaluate`: metrics.json (weighted F1, accuracy, per-class F1) of every head and
ensemble, and a confusion plot of the main one."""
import json

from features.params import from_section
from models.training.train_config import EvaluateConfig
from models.training.stage import evaluate
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--heads", required=True, help="folder of trained heads")
    p.add_argument("--ensembles", default=None, help="folder of ensembles (scored like heads)")
    p.add_argument("--out", required=True, help="output folder for metrics and plots")
    args = p.parse_args(argv)
    setup()
    cfg = from_section(EvaluateConfig, load_params("evaluate", args.params), "evaluate")
    metrics = evaluate(args.heads, cfg.main_head, args.out, args.ensembles)
    width = max(len(h) for h in metrics)
    print(f"{'head':<{width}}  weighted_f1  accuracy  (out-of-fold, labelled clips)")
    for head, m in metrics.items():
        print(f"{head:<{width}}  {m['weighted_f1']:>11.4f}  {m['accuracy']:>8.4f}")
    print(json.dumps({h: m["weighted_f1"] for h, m in metrics.items()}))


if __name__ == "__main__":
    run(main)
