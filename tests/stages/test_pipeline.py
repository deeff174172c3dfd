"""End to end on a tiny corpus through real `dvc repro`: outputs, no-op rerun, targeted rerun."""
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from features.media.ffmpeg import ffmpeg_exe
from features.storage.store import StoreReader

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("neutral", "angry", "happy", "sad", "worried", "surprise")
pytestmark = pytest.mark.slow


def _video(path: Path, tone_hz: int, seconds: float = 1.0) -> None:
    subprocess.run(
        [ffmpeg_exe(), "-v", "error", "-y",
         "-f", "lavfi", "-i", f"testsrc=size=64x64:rate=10:duration={seconds}",
         "-f", "lavfi", "-i", f"sine=frequency={tone_hz}:sample_rate=44100:duration={seconds}",
         "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-shortest", str(path)],
        check=True)


def _tiny_params() -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"].update(videos="data/video", labels="data/labels.csv",
                             unlabelled="data/unlabelled", folds=2)
    params["denoise"]["backend"] = "none"
    params["faces"].update(fps=2.0, size=32, max_frames=2)
    params["embed"]["encoders"] = {
        # the standins stage's relative folder: each checkout resolves it to its own path
        "hubert": {**params["embed"]["encoders"]["hubert"], "layers_frames": [3, -1]},
        "minilm": params["embed"]["encoders"]["minilm"],
    }
    params["train"]["heads"] = {
        "probe_hubert": {"type": "probe", "features": ["hubert"], "layer": "mean", "epochs": 3},
        "attention": {"type": "attention", "features": ["hubert", "minilm"], "epochs": 3},
        # heads on derived stores: `mer predict` runs their saved transforms on new clips
        "probe_lora": {"type": "probe", "features": ["hubert_lora"], "layer": -1, "epochs": 3},
        "probe_aligned": {"type": "probe", "features": ["clip_aligned"], "layer": -1, "epochs": 3},
    }
    params["probe"].update(epochs=3)
    params["ensemble"] = {"vote": {"method": "soft", "heads": ["probe_hubert", "attention"]}}
    params["align"].update(source="minilm", target="hubert")  # the unlabelled-pool stages
    params["semi"].update(heads=["probe_hubert", "attention"],
                          rounds={"r1": {"after": "base", "default_threshold": 0.2, "caps": 1}})
    params["priors"].update(heads=["attention", "vote"])
    # joint@ needs an LLM this project leaves out (tests/models/adapt/test_joint_llm.py runs it);
    # noise@ is tested in tests/features/noise/test_noise.py
    params["adapt"] = {"hubert_lora": {"encoder": "hubert", "layers": [4, 4], "rank": 2, "alpha": 4,
                                       "epochs": 1, "batch_size": 4, "max_frames": 16, "seed": 0}}
    params["joint"] = {}
    params["noise"]["conditions"] = {}
    return params


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A fresh git+DVC project holding this repo's code and dvc.yaml, and 14 tiny clips."""
    proj = tmp_path_factory.mktemp("proj")
    for name in ("features", "models", "stages"):
        shutil.copytree(ROOT / name, proj / name, ignore=shutil.ignore_patterns("__pycache__"))
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    del stages["stages"]["noise_report"]  # nothing to report without noise conditions
    (proj / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    shutil.copy(ROOT / ".gitignore", proj / ".gitignore")
    (proj / "data/video").mkdir(parents=True)
    shutil.copy(ROOT / "data/no_transcripts.csv", proj / "data/no_transcripts.csv")
    shutil.copy(ROOT / "data/uniform_priors.json", proj / "data/uniform_priors.json")
    (proj / "data/unlabelled").mkdir()
    rows = []
    for i in range(12):
        name = f"clip_{i:02d}"
        _video(proj / "data/video" / f"{name}.mp4", 200 + 60 * (i % 6))
        rows.append((name, CLASSES[i % 6]))
    for i in range(2):
        _video(proj / "data/unlabelled" / f"unlab_{i}.mp4", 300)
    with open(proj / "data/labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([("name", "discrete"), *rows])
    (proj / "params.yaml").write_text(yaml.safe_dump(_tiny_params()))
    env = _env()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"],
                ["dvc", "config", "core.analytics", "false"]):
        subprocess.run(cmd, cwd=proj, check=True, env=env)
    return proj


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return env


def _repro(proj: Path) -> str:
    done = subprocess.run(["dvc", "repro"], cwd=proj, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _ran(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage")}


def test_repro_builds_everything_then_noop_then_only_what_changed(project):
    first = _ran(_repro(project))
    assert {"standins", "prepare", "audio", "denoise", "asr", "faces", "embed@hubert", "embed@minilm",
            "adapt@hubert_lora",
            "train@probe_hubert", "train@attention", "probe@hubert", "probe@minilm",
            "ensemble@vote", "evaluate", "align", "priors", "semi_base", "semi@r1",
            "semi_report"} <= first

    with StoreReader(project / "artifacts/audio/audio", kind="audio") as s:
        assert len(s) == 14 and s.get("clip_00").dtype.name == "float32"
        assert 15000 < len(s.get("clip_00")) < 17000  # 1 s at 16 kHz
    with StoreReader(project / "artifacts/features/hubert", kind="embedding") as s:
        layers, n, dim = s.pooled_shape
        assert n == 14 and layers == s.meta["num_layers"] and s.get("clip_00").shape[0] == 2
    metrics = json.loads((project / "results/metrics.json").read_text())
    assert set(metrics["heads"]) == {"probe_hubert", "attention", "probe_lora", "probe_aligned", "vote"}
    assert metrics["ensembles"] == ["vote"]
    assert 0.0 <= metrics["heads"]["attention"]["weighted_f1"] <= 1.0
    assert (project / "results/confusion.png").stat().st_size > 1000

    assert _ran(_repro(project)) == set()  # nothing changed: nothing runs

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["embed"]["encoders"]["hubert"]["layers_frames"] = [0, 3, -1]
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    rerun = _ran(_repro(project))
    assert "embed@hubert" in rerun
    assert not rerun & {"prepare", "audio", "denoise", "asr", "faces", "embed@minilm"}
    with StoreReader(project / "artifacts/features/hubert") as s:
        assert s.get("clip_00").shape[0] == 3


ONE_NEW_CLIP = ("[audio] 15 clips: 14 cached, 1 to compute",
                "[faces] 15 clips: 14 cached, 1 to compute",
                "[denoise[none]] 15 clips: 14 cached, 1 to compute",
                "[asr] 15 clips: 14 cached or given, 1 to transcribe",
                "[embed hubert] 15 clips: 14 cached, 1 to encode",
                "[embed minilm] 15 clips: 14 cached, 1 to encode",
                "[adapt hubert_lora] 15 clips (12 labelled): 14 cached, 1 to write")


def test_adding_a_clip_computes_only_that_clip(project):
    _video(project / "data/unlabelled" / "unlab_new.mp4", 440)
    log = _repro(project)
    for line in ONE_NEW_CLIP:
        assert line in log, log[-4000:]
    with StoreReader(project / "artifacts/features/minilm") as s:
        assert len(s) == 15 and "unlab_new" in s
    (project / "data/unlabelled" / "unlab_new.mp4").unlink()
    _repro(project)
    with StoreReader(project / "artifacts/features/minilm") as s:
        assert len(s) == 14 and "unlab_new" not in s


def test_predict_new_videos_and_per_file_errors(project):
    new = project.parent / "new_clip.mp4"
    _video(new, 330)
    (project.parent / "broken.mp4").write_bytes(b"not a video")
    done = subprocess.run(["mer", "predict", str(new), str(project.parent / "broken.mp4"),
                           "missing.mp4", "--json"], cwd=project, env=_env(),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    good, broken, missing = json.loads(done.stdout)
    assert good["emotion"] in CLASSES and abs(sum(good["probabilities"].values()) - 1) < 1e-3
    assert "broken.mp4" in broken["error"] and "emotion" not in broken
    assert "no such file" in missing["error"]
    assert "broken.mp4" in done.stderr
    # an ensemble predicts too: its member heads on the same cached features, combined
    vote = subprocess.run(["mer", "predict", str(new), "--head", "vote", "--json"], cwd=project,
                          env=_env(), capture_output=True, text=True)
    assert vote.returncode == 0, vote.stderr[-3000:]
    [ens] = json.loads(vote.stdout)
    assert ens["emotion"] in CLASSES and abs(sum(ens["probabilities"].values()) - 1) < 1e-3
    for head in ("probe_lora", "probe_aligned"):  # derived features through the saved weights
        done = subprocess.run(["mer", "predict", str(new), "--head", head, "--json"], cwd=project,
                              env=_env(), capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)[0]["emotion"] in CLASSES
    with StoreReader(project / "artifacts/predict/features/hubert") as s:
        assert s.ids == ["new_clip"]  # the predict cache, not the corpus stores


def _run(args: list[str], cwd: Path, env: dict | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, env=env or _env(), capture_output=True, text=True)
    assert done.returncode == 0, f"{args}: " + done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def _share(project: Path, remote: str, extra: list[list[str]] = (), env=None) -> None:
    """Commit the project to git and push its DVC outputs to `remote` (what the extractor does)."""
    _run(["dvc", "remote", "add", "-f", "-d", "shared", remote], project)
    for cmd in extra:
        _run(cmd, project)
    _run(["git", "add", "-A"], project)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "share",
          "--allow-empty"], project)
    _run(["dvc", "push"], project, env)


def _teammate_gets_everything(project: Path, clone: Path, pull: list[str], env=None) -> None:
    """A fresh clone gets the stores from the remote and recomputes nothing."""
    _run(["git", "clone", "-q", str(project), str(clone)], project.parent, env)
    log = _run(pull, clone, env)
    if pull[:2] == ["dvc", "pull"]:
        log = _run(["dvc", "repro"], clone, env)
    assert _ran(log) == set(), log[-3000:]
    assert "Data and pipelines are up to date" in _run(["dvc", "status"], clone, env)
    for name in ("audio/audio", "features/hubert", "features/minilm"):
        with StoreReader(project / "artifacts" / name) as a, StoreReader(clone / "artifacts" / name) as b:
            assert a.ids == b.ids and a.meta == b.meta
            np.testing.assert_array_equal(a.get(a.ids[0]), b.get(b.ids[0]))


def test_teammate_pulls_from_a_folder_remote_and_runs_nothing(project, tmp_path):
    _share(project, str(tmp_path / "remote"))
    _teammate_gets_everything(project, tmp_path / "mate_pull", ["dvc", "pull"])
    _teammate_gets_everything(project, tmp_path / "mate_repro", ["dvc", "repro", "--pull"])


def test_teammate_in_another_folder_adds_a_clip_and_computes_only_it(project, tmp_path):
    """The team case: a clone in another folder (its own resolved model paths) pulls the stores,
    adds one clip, and every per-clip stage, the LoRA store included, computes that clip only."""
    _share(project, str(tmp_path / "remote"))
    clone = tmp_path / "elsewhere" / "deeper" / "mate"
    clone.parent.mkdir(parents=True)
    _run(["git", "clone", "-q", str(project), str(clone)], project.parent)
    _run(["dvc", "pull"], clone)
    _video(clone / "data/unlabelled" / "unlab_mate.mp4", 470)
    log = _run(["dvc", "repro"], clone)
    assert "standins" not in _ran(log)  # pulled, never rebuilt
    for line in ONE_NEW_CLIP:
        assert line in log, log[-4000:]
    with StoreReader(clone / "artifacts/features/hubert") as s:
        assert len(s) == 15 and "unlab_mate" in s


@pytest.fixture
def s3_server():
    """moto's S3 server on 127.0.0.1 (skipped where moto[server] or dvc-s3 are not installed)."""
    pytest.importorskip("dvc_s3")
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto_server not installed (pip install 'moto[server]')")
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = dict(_env(), AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
               AWS_DEFAULT_REGION="us-east-1")
    import time
    import urllib.request
    for _ in range(100):
        try:
            urllib.request.urlopen(url, timeout=1)  # noqa: S310 - local test server
            break
        except OSError:
            time.sleep(0.1)
    import boto3
    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="test",
                 aws_secret_access_key="test").create_bucket(Bucket="features")
    yield url, env
    proc.terminate()
    proc.wait(timeout=10)


def test_teammate_pulls_from_an_s3_remote_and_runs_nothing(project, tmp_path, s3_server):
    url, env = s3_server
    _share(project, "s3://features/mer", [["dvc", "remote", "modify", "shared", "endpointurl", url]],
           env)
    _teammate_gets_everything(project, tmp_path / "mate_s3", ["dvc", "pull"], env)


def test_no_hdf5_tracked_by_git():
    tracked = subprocess.run(["git", "ls-files", "*.h5", "*.hdf5"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
    assert tracked == "", f"HDF5 files must be DVC outputs, not in git: {tracked}"
