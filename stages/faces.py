"""DVC stage `faces`: sample frames, crop faces (OpenCV Haar), store uint8 crops."""
from features.params import from_section
from features.media.stages import crop_faces
from features.media.faces import FacesConfig
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--manifest", required=True)
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    setup()
    crop_faces(args.manifest, from_section(FacesConfig, load_params("faces", args.params), "faces"),
               args.out)


if __name__ == "__main__":
    run(main)
