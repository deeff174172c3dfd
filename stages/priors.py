"""DVC stage `priors`: prior-shift correction (EM or user-given priors) of heads and ensembles."""
import json

from features.params import from_section
from features.media.manifest import read_manifest
from models.training.bundles import scored
from models.unlabelled.priors import PriorsConfig, correct_predictions
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--manifest", required=True)
    p.add_argument("--heads", required=True, help="folder of trained heads")
    p.add_argument("--ensembles", required=True, help="folder of ensembles")
    p.add_argument("--out", required=True, help="output folder: <name>/predictions.csv")
    p.add_argument("--report", required=True, help="JSON of the priors used per head")
    args = p.parse_args(argv)
    setup()
    cfg = from_section(PriorsConfig, load_params("priors", args.params), "priors")
    unlabelled = load_params("prepare", args.params).get("unlabelled", "")
    out = correct_predictions(cfg, scored(args.heads, args.ensembles),
                              read_manifest(args.manifest), unlabelled, args.out,
                              args.report)
    print(json.dumps({k: v.get("priors") if isinstance(v, dict) else v for k, v in out.items()}))


if __name__ == "__main__":
    run(main)
