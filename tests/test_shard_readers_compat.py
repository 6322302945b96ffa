"""Our shards are read unchanged by other tools: webdataset itself and open_clip's own trainer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import webdataset as wds

from pipeline.layout import RunLayout
from stages import shard
from tests.corpora import make_folder_corpus

pytestmark = pytest.mark.slow   # runs whole stages or kills processes: not in the fast tier

# open_clip's trainer, unmodified, with our tiny model config registered (it is not one of open_clip's).
OPEN_CLIP_TRAIN = textwrap.dedent("""
    import sys
    import open_clip
    from trainer.models.clip import our_model_configs  # registers trainer/models/model_configs with open_clip
    from open_clip_train.main import main
    main(sys.argv[1:])
""")


def test_webdataset_reads_shards_with_decoding(ray_local, tmp_path, write_manifest):
    make_folder_corpus(tmp_path / "corpus", n_good=7, hostile=False)
    m = write_manifest(f"corpus: {{format: folder, path: {tmp_path / 'corpus'}}}\nshard: {{samples_per_shard: 3}}\n")
    shard.run(m)
    layout = RunLayout.of(m)
    urls = f"{layout.shards.root}/{{00000..00002}}.tar"
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg", "txt", "json"))
    assert len(samples) == 7
    image, caption, meta = samples[0]
    assert image.size == (meta["width"], meta["height"]) and caption == meta["caption"]


def test_open_clip_trainer_reads_shards(ray_local, tmp_path, write_manifest):
    make_folder_corpus(tmp_path / "corpus", n_good=8, hostile=False)
    m = write_manifest(f"corpus: {{format: folder, path: {tmp_path / 'corpus'}}}\nshard: {{samples_per_shard: 4}}\n")
    shard.run(m)
    shards = RunLayout.of(m).shards.root
    assert json.loads((shards / "sizes.json").read_text()) == {"00000.tar": 4, "00001.tar": 4}
    logs = tmp_path / "logs"
    args = ["--model", "RN50-tiny", "--dataset-type", "webdataset",
            "--train-data", f"{shards}/{{00000..00001}}.tar", "--train-num-samples", "8",
            "--batch-size", "4", "--epochs", "1", "--workers", "0", "--device", "cpu",
            "--precision", "fp32", "--logs", str(logs), "--name", "compat", "--save-frequency", "0",
            "--report-to", "", "--warmup", "1", "--lr", "1e-4", "--log-every-n-steps", "1"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", OPEN_CLIP_TRAIN, *args], capture_output=True, text=True,
                            timeout=300, env=env, cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    log_text = (logs / "compat" / "out.log").read_text()
    # two steps of 4 samples each were read from our tars and trained on
    assert "Train Epoch: 0 [8/8" in log_text, log_text[-2000:]
