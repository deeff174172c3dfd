"""DVC stage `asr`: transcripts per clip (a user transcript CSV wins over ASR)."""
from features.audio.asr import AsrConfig
from features.params import from_section
from features.audio.stages import transcribe_audio
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--audio", required=True, help="audio store (denoised) to transcribe")
    p.add_argument("--raw-audio", default=None,
                   help="audio store before denoising (read only with asr.enhance.select)")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    setup()
    transcribe_audio(args.audio, from_section(AsrConfig, load_params("asr", args.params), "asr"),
                     args.out, args.raw_audio)


if __name__ == "__main__":
    run(main)
