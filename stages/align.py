"""DVC stage `align`: visual features mapped into the acoustic space, written as a feature store.

The fitted map is saved under --trained with the record of what it was fitted on; it is refitted
only when that record changes, and clips added later are mapped with it
(models/unlabelled/align.py)."""
import json

from features.params import from_section
from models.unlabelled.align import AlignConfig, align_store
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", required=True, help="folder of embedding stores")
    p.add_argument("--out", required=True, help="the aligned store (artifacts/features/<name>)")
    p.add_argument("--trained", default="", help="folder of the saved map and its record "
                   "(default: artifacts/align/<name> beside the features folder)")
    args = p.parse_args(argv)
    setup()
    cfg = from_section(AlignConfig, load_params("align", args.params), "align")
    unlabelled = load_params("prepare", args.params).get("unlabelled", "")
    info = align_store(cfg, args.manifest, args.features, unlabelled, args.out,
                       args.trained or None)
    print(json.dumps({k: info.get(k) for k in ("fit_clips", "clips", "transductive",
                                               "holdout_r2", "refitted", "mapped")}))


if __name__ == "__main__":
    run(main)
