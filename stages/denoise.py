"""DVC stage `denoise`: run the configured denoiser (mossformer2 | deepfilternet | none)."""
from features.params import from_section
from features.audio.denoise import DenoiseConfig
from features.audio.stages import denoise_audio
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--audio", required=True, help="audio store from the audio stage")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    setup()
    denoise_audio(args.audio, from_section(DenoiseConfig, load_params("denoise", args.params),
                                           "denoise"), args.out)


if __name__ == "__main__":
    run(main)
