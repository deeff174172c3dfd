"""DVC stage `probe@<encoder>`: a probe per layer and a learnt layer weighting under the CV folds."""
import json
import time

from features.params import from_section
from models.training.layer_probing import ProbeConfig, probe_encoder
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("encoder", help="name under embed.encoders in params.yaml")
    p.add_argument("--manifest", required=True)
    p.add_argument("--store", required=True, help="the encoder's embedding store")
    p.add_argument("--out", required=True, help="output folder for this encoder's probe")
    args = p.parse_args(argv)
    setup()
    cfg = from_section(ProbeConfig, load_params("probe", args.params), "probe")
    start = time.perf_counter()
    best = probe_encoder(args.encoder, args.manifest, args.store, args.out, cfg)
    print(f"[probe {args.encoder}] {best['layers']} layers, {best['clips']} clips in "
          f"{time.perf_counter() - start:.1f} s: best layer {best['best_layer']} "
          f"(weighted F1 {best['weighted_f1']:.4f}); learnt layer weighting "
          f"{best['featurizer_weighted_f1']}")
    print(json.dumps({k: best[k] for k in ("encoder", "best_layer", "weighted_f1", "top_layers")}))


if __name__ == "__main__":
    run(main)
