"""DVC stage `audio`: decode every clip to 16 kHz mono PCM in one HDF5 store."""
from features.params import from_section
from features.media.stages import AudioConfig, extract_audio
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    setup()
    extract_audio(args.manifest, from_section(AudioConfig, load_params("audio", args.params), "audio"),
                  args.out)


if __name__ == "__main__":
    run(main)
