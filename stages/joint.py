"""DVC stage `joint@<name>`: paper 002's joint audio-text LLM module on cached speech frames and
LLM token states (models/adapt/joint_llm.py), out-of-fold pooled states into a feature store."""
from features.params import from_section
from features.encoders import EncoderConfig
from models.adapt.joint_llm import JointConfig
from models.adapt.joint_stage import joint_store
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("name", help="name under joint in params.yaml (also the output store's name)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--features", required=True, help="folder of feature stores")
    p.add_argument("--out", required=True, help="folder for report.json and trained/ (the saved fold models)")
    args = p.parse_args(argv)
    setup()
    cfg = from_section(JointConfig, load_params(f"joint.{args.name}", args.params), f"joint.{args.name}")
    where = f"embed.encoders.{cfg.llm}"
    llm_cfg = from_section(EncoderConfig, load_params(where, args.params), where)
    joint_store(args.name, cfg, llm_cfg, args.manifest, args.features, args.out)


if __name__ == "__main__":
    run(main)
