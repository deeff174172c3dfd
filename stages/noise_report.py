"""DVC stage `noise_report`: weighted F1 and ASR error rate (CER on Chinese, WER otherwise) against SNR over every noise condition
(results/noise/metrics.json, plot rows and PNG charts)."""
from features.params import from_section
from features.noise.copies import NoiseConfig
from models.noise.evaluation import report
from stages.common import load_params, parser, run, setup


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--scores", required=True, help="folder with one subfolder per condition")
    p.add_argument("--out", required=True, help="output folder")
    args = p.parse_args(argv)
    setup()
    cfg = from_section(NoiseConfig, load_params("noise", args.params), "noise")
    metrics = report(args.scores, list(cfg.conditions), args.out)
    for cond, m in metrics.items():
        print(f"{cond:<14} snr {m['snr_db']}  {m['wer_unit']} {m['wer']}")


if __name__ == "__main__":
    run(main)
