"""DVC stage `semi_report`: per-round metrics and per-class gains of the rounds, as DVC plots."""
import json

from models.unlabelled.rounds import report, semi_config
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--rounds", required=True, help="folder holding every round's output folder")
    p.add_argument("--out", required=True, help="folder for metrics.json, gain.json, plots/")
    args = p.parse_args(argv)
    setup()
    print(json.dumps(report(semi_config(load_params("semi", args.params)), args.rounds,
                            args.out)["heads"]))


if __name__ == "__main__":
    run(main)
