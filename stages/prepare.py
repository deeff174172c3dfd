"""DVC stage `prepare`: scan videos + labels into manifest.csv and failures.json."""
from features.params import from_section
from features.media.manifest import PrepareConfig, prepare
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    setup()
    cfg = from_section(PrepareConfig, load_params("prepare", args.params), "prepare")
    clips = prepare(cfg, args.out)
    print(f"[prepare] {len(clips)} clips, {sum(bool(c.label) for c in clips)} labelled")


if __name__ == "__main__":
    run(main)
