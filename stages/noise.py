"""DVC stage `noise@<condition>`: noisy copies of chosen clips, every media stage and encoder the
scored heads need on them (per denoise backend, with and without ASR enhancement), and the heads'
weighted F1 and the ASR word error rate under that condition (`scores.json`)."""
import yaml

from features.params import from_section
from features.noise.copies import NoiseConfig
from models.noise.evaluation import run_condition
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("condition", help="a key of noise.conditions in params.yaml")
    p.add_argument("--manifest", required=True, help="manifest from the prepare stage")
    p.add_argument("--heads", required=True, help="folder of trained heads")
    p.add_argument("--out", required=True, help="output folder of this condition")
    args = p.parse_args(argv)
    setup()
    cfg = from_section(NoiseConfig, load_params("noise", args.params), "noise")
    with open(args.params, encoding="utf-8") as fh:
        params = yaml.safe_load(fh)
    result = run_condition(args.condition, cfg, params, args.manifest, args.heads, args.out)
    for head, variants in result["wf1"].items():
        print(f"[noise@{args.condition}] {head}: " +
              ", ".join(f"{v} {r['wf1']:.3f}" for v, r in variants.items()))
    unit = (result["wer_unit"] or "wer").upper()
    print(f"[noise@{args.condition}] {unit}: " + ", ".join(f"{v} {w:.3f}" for v, w in result["wer"].items()))


if __name__ == "__main__":
    run(main)
