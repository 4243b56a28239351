"""The image codec: shapes, index decoding, files, training (single process, DDP, resume), bad inputs, eval."""

import io
import json
import math
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tessera.cli import main as cli
from tessera.config import ConfigError
from tessera.errors import TesseraError
from tessera.runtime.monitor import read_metrics
from tessera.unimodal import load_codec, read_codec_info
from tessera.unimodal.image import ImageCodec, ImageCodecConfig, ImageSizeError
from tessera.unimodal.image_data import InfiniteBatchSampler, Skip, TrainImages
from tessera.unimodal.image_train import resolve_configs
from tessera.unimodal.losses import ssim

# A network small enough for many CPU steps a second, still f=8 with a mid attention block.
MICRO = dict(channels=8, channel_mult=[1, 1, 2, 2], num_res_blocks=1, z_channels=16, norm_groups=4,
             fsq_levels=[8, 5, 5, 5], vq_codebook_size=64, vq_dim=4, image_size=16, max_size=64)
MICRO_SET = ["channels=8", "channel_mult=1,1,2,2", "num_res_blocks=1", "z_channels=16", "norm_groups=4",
             "image_size=16", "vq_codebook_size=64", "vq_dim=4", "batch_size=4", "warmup_steps=2",
             "log_every=1", "eval_every=1000", "ckpt_every=1000", "cache_mb=64"]


def micro(quantizer="fsq") -> ImageCodec:
    torch.manual_seed(0)
    return ImageCodec(ImageCodecConfig(quantizer=quantizer, **MICRO))


def write_images(d: Path, n: int, size=(24, 24), seed=0) -> Path:
    """Smooth random color images (blobs on white), like simple drawings."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : size[1], 0 : size[0]]
    for i in range(n):
        a = np.full((size[1], size[0], 3), 255.0)
        for _ in range(3):
            cx, cy, r = rng.uniform(0, size[0]), rng.uniform(0, size[1]), rng.uniform(3, 8)
            m = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))[..., None]
            a = a * (1 - m) + m * rng.uniform(0, 255, 3)
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return d


# ------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_encode_decode_shapes_and_dtypes_for_non_square_sizes(quantizer):
    codec = micro(quantizer)
    x = torch.rand(2, 3, 24, 40)
    codes = codec.encode(x)
    assert codes.shape == (2, 3, 5) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < codec.info.codebook_size
    y = codec.decode(codes)
    assert y.shape == (2, 3, 24, 40) and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # tall images too, single (3, H, W) images and (h, w) code grids
    assert codec.encode(torch.rand(3, 48, 16)).shape == (1, 6, 2)
    assert codec.decode(codes[0]).shape == (1, 3, 24, 40)
    # PIL images (and uint8 tensors) give the same codes as float tensors
    pils = [Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for i in range(2)]
    as_u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(codec.encode(pils), codec.encode(as_u8))
    assert torch.equal(codec.encode(pils[0]), codec.encode(as_u8[:1]))


def test_bad_sizes_and_codes_are_clear_errors():
    codec = micro()
    with pytest.raises(ImageSizeError, match="30x40 is not a multiple of the codec's downsampling factor 8"):
        codec.encode(torch.rand(1, 3, 30, 40))
    with pytest.raises(ImageSizeError, match="must share a size"):
        codec.encode([Image.new("RGB", (16, 16)), Image.new("RGB", (24, 16))])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 1000\)"):
        codec.decode(torch.full((1, 2, 2), 1000))
    with pytest.raises(ValueError, match="integers"):
        codec.decode(torch.zeros(1, 2, 2))


@pytest.mark.parametrize("quantizer", ["fsq", "vq"])
def test_decoding_indices_equals_decoding_the_forward_pass(quantizer):
    """For vq this is the image-fmap path with codebook_dim (4) != dim (16), where the library's own
    get_output_from_indices (1.32) fails; the codec's lookup must match the forward pass."""
    codec = micro(quantizer)
    assert codec.config.vq_dim != codec.config.z_channels
    x = torch.rand(3, 3, 16, 24) * 2 - 1
    if quantizer == "vq":  # move the codebook away from its initialization: EMA updates and dead-code swaps
        codec.train()
        for _ in range(3):
            codec(x)
    codec.eval()
    with torch.no_grad():
        z = codec.encoder(x)
        zq, codes, _ = codec.quantizer(z)
        recon, codes2, _ = codec(x)
        zq_from_codes = codec.quantizer.latent(codes)
    assert torch.equal(codes, codes2)
    assert torch.allclose(zq_from_codes, zq, atol=1e-6)
    assert torch.allclose(codec.decode(codes), ((recon + 1) / 2).clamp(0, 1), atol=1e-5)
    assert torch.equal(codec.encode((x + 1) / 2), codes)


def test_vq_codebook_moves_and_quantizer_runs_in_fp32_under_autocast():
    codec = micro("vq")
    before = codec.quantizer.codebook.clone()
    codec.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        zq, _, aux = codec.quantizer(codec.encoder(torch.rand(2, 3, 16, 16)))
    assert zq.dtype == torch.float32 and aux.requires_grad
    assert not torch.equal(before, codec.quantizer.codebook)  # EMA update happened
    # l2-normalized low-dimensional codes (LlamaGen's recipe)
    assert codec.quantizer.codebook.shape == (64, 4)
    assert torch.allclose(codec.quantizer.codebook.norm(dim=-1), torch.ones(64), atol=1e-4)


def test_codec_directory_round_trip(tmp_path):
    codec = micro("vq")
    codec.save(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["codec.json", "model.safetensors"]
    meta = json.loads((tmp_path / "c" / "codec.json").read_text())
    assert meta["format"] == "tessera-codec" and meta["version"] == 1 and meta["kind"] == "image"
    assert meta["config"]["quantizer"] == "vq"
    info = read_codec_info(tmp_path / "c")
    assert info == codec.info and info.downsample == 8 and info.codebook_size == 64 and info.default_size == (16, 16)
    loaded = load_codec(tmp_path / "c")
    assert isinstance(loaded, ImageCodec) and not loaded.training
    x = torch.rand(2, 3, 16, 32)
    assert torch.equal(loaded.encode(x), codec.encode(x))
    assert torch.equal(loaded.quantizer.codebook, codec.quantizer.codebook)


def test_ssim_matches_scikit_image():
    skm = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 40, 32, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ref = skm.structural_similarity(x[0].numpy(), y[0].numpy(), gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0, channel_axis=0)
    assert abs(float(ssim(x, y)) - ref) < 1e-4
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)


def test_overrides_are_routed_and_unknown_keys_refused():
    m, t = resolve_configs("tiny", ["quantizer=vq", "lr=1e-3", "channel_mult=1,2,2,2,4"])
    assert m.quantizer == "vq" and t.lr == 1e-3 and m.downsample == 16
    with pytest.raises(ConfigError, match="no key 'bogus'"):
        resolve_configs("tiny", ["bogus=1"])
    with pytest.raises(ConfigError, match="unknown image codec preset"):
        resolve_configs("huge", [])
    tiny = resolve_configs("tiny", [])[0]
    assert tiny.downsample == 8 and tiny.codebook_size <= 1024 and tiny.image_size == 32  # the demo's needs


def test_sampler_is_resumable_and_shards_ranks():
    full = InfiniteBatchSampler(10, 3, seed=1)
    it = iter(full)
    first = [next(it) for _ in range(7)]
    resumed = iter(InfiniteBatchSampler(10, 3, seed=1, start=4))
    assert [next(resumed) for _ in range(3)] == first[4:]
    r0, r1 = InfiniteBatchSampler(10, 5, rank=0, world=2), InfiniteBatchSampler(10, 5, rank=1, world=2)
    assert not set(r0.batch(0)) & set(r1.batch(0)) and len(r0.batch(0)) == 5


# ------------------------------------------------------------------------------------------ bad inputs
def _png_with_claimed_size(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (valid CRC) but holds no image data."""
    sig = b"\x89PNG\r\n\x1a\n"
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    end = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
    return sig + chunk + end


def make_bad_inputs(d: Path) -> dict[str, Path]:
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    good = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    buf = io.BytesIO()
    good.save(buf, format="PNG")
    (d / "corrupt.png").write_bytes(b"this is not an image" * 10)
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    Image.new("RGB", (4, 20), (10, 20, 30)).save(d / "tiny.png")  # shorter side < one token (8 px)
    (d / "bomb.png").write_bytes(_png_with_claimed_size(5000, 5000))  # 25 Mpx > the 16.7 Mpx cap
    Image.new("L", (24, 24), 100).save(d / "gray.png")
    pal = Image.new("P", (24, 24), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.save(d / "palette.png")
    rgba = Image.new("RGBA", (24, 24), (0, 0, 0, 0))  # fully transparent: white after compositing
    rgba.save(d / "rgba.png")
    Image.new("CMYK", (24, 24), (0, 255, 255, 0)).save(d / "cmyk.jpg")  # red in CMYK
    Image.fromarray(np.full((24, 24), 65535, dtype=np.uint16)).save(d / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    Image.new("RGB", (40, 24), (0, 128, 0)).save(d / "exif.jpg", exif=exif.tobytes(), quality=95)
    for name in ("corrupt.png", "truncated.png", "tiny.png", "bomb.png", "gray.png", "palette.png", "rgba.png",
                 "cmyk.jpg", "deep16.png", "exif.jpg"):
        paths[name.split(".")[0]] = d / name
    return paths


def test_each_bad_input_kind_gets_its_outcome(tmp_path):
    p = make_bad_inputs(tmp_path / "bad")
    names = list(p)
    ds = TrainImages([p[n] for n in names], size=16, min_side=8, crop_scale=(1.0, 1.0), flip=False)
    out = {n: ds[i] for i, n in enumerate(names)}
    assert {n: o.reason for n, o in out.items() if isinstance(o, Skip)} == {
        "corrupt": "corrupt", "truncated": "corrupt", "tiny": "too_small", "bomb": "too_large"}
    assert "exceeds the cap" in out["bomb"].message
    for n in ("gray", "palette", "rgba", "cmyk", "deep16", "exif"):
        assert isinstance(out[n], torch.Tensor) and out[n].shape == (3, 16, 16) and out[n].dtype == torch.uint8
    assert (out["gray"] == 100).all()
    assert out["palette"][:, 0, 0].tolist() == [255, 0, 0]
    assert (out["rgba"] == 255).all()  # composited on white
    r, g, b = out["cmyk"][:, 8, 8].tolist()
    assert r > 200 and g < 60 and b < 60
    assert (out["deep16"] == 255).all()  # 16-bit full scale -> 8-bit full scale
    im = ds._image(names.index("exif"))  # stored 40x24 with "rotate 90" in EXIF: used as portrait
    assert im.width < im.height and im.size == (16, 27)  # (kept at the largest size a crop can use)


def test_a_training_run_survives_bad_inputs_and_reports_them(tmp_path, capsys):
    write_images(tmp_path / "data", 6)
    make_bad_inputs(tmp_path / "data")
    rc = cli(["tokenizer", "train", "image", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"),
              "--max-steps", "6", "--no-progress", "--set", "eval_fraction=0.01",
              *[a for s in MICRO_SET for a in ("--set", s)], "--set", "batch_size=5"])
    assert rc == 0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    # 15 training files (one held out) in epochs of 3 batches of 5: every file is seen twice in 6 steps,
    # and each bad one is counted once
    assert summary["skipped"]["counts"] == {"corrupt": 2, "too_large": 1, "too_small": 1}
    out = capsys.readouterr().out
    assert "4 skipped: corrupt=2, too_large=1, too_small=1" in out and "exceeds the cap" in out


# -------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgdata")
    write_images(d / "train", 16, seed=0)
    write_images(d / "test", 4, seed=1)
    return d


def train(data, out, *extra, steps=4):
    return cli(["tokenizer", "train", "image", "--data", str(data), "--out", str(out), "--max-steps", str(steps),
                "--no-progress", *[a for s in MICRO_SET for a in ("--set", s)], *extra])


def test_training_writes_a_codec_directory_metrics_and_samples(image_data, tmp_path):
    assert train(image_data, tmp_path / "run", "--set", "eval_every=2") == 0
    run = tmp_path / "run"
    assert (run / "codec.json").is_file() and (run / "model.safetensors").is_file()
    assert (run / "samples" / "step_000002.png").is_file() and (run / "samples" / "step_000004.png").is_file()
    grid = Image.open(run / "samples" / "step_000004.png")
    assert grid.height == 2 * 16 + 6  # originals above reconstructions
    recs = read_metrics(run)
    evals = [r for r in recs if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert {"eval/ssim", "eval/codebook_usage", "eval/perplexity"} <= set(evals[0])
    assert 0 < evals[-1]["eval/codebook_usage"] <= 1 and evals[-1]["eval/n_images"] == 4
    codec = ImageCodec.load(run)
    assert codec.encode(torch.rand(1, 3, 16, 16)).shape == (1, 2, 2)
    with pytest.raises(FileExistsError, match="--resume"):  # an existing run is never overwritten silently
        from tessera.unimodal.image_train import train_image_codec

        train_image_codec(image_data, run, max_steps=2, overrides=MICRO_SET, progress=False)


def test_resume_continues_from_the_saved_step_exactly(image_data, tmp_path):
    # random crops and flips: the data RNG must be restored too
    common = ["--set", "cooldown=0", "--set", "ckpt_every=4", "--set", "crop_scale=0.5,1", "--set", "flip=true"]
    assert train(image_data, tmp_path / "straight", *common, steps=8) == 0
    assert train(image_data, tmp_path / "split", *common, steps=4) == 0
    assert train(image_data, tmp_path / "split", "--resume", *common, "--set", "channels=16", steps=8) == 2
    assert train(image_data, tmp_path / "split", "--resume", *common, steps=8) == 0
    summary = json.loads((tmp_path / "split" / "train_summary.json").read_text())
    assert summary["step"] == 8
    steps = [r["step"] for r in read_metrics(tmp_path / "split") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 8 and 5 in steps  # no duplicated history
    a = ImageCodec.load(tmp_path / "straight").state_dict()
    b = ImageCodec.load(tmp_path / "split").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # same data order, optimizer and RNG: the same weights


def test_gan_and_feature_matching_run_after_the_warmup(image_data, tmp_path):
    assert train(image_data, tmp_path / "gan", "--set", "disc_weight=0.5", "--set", "disc_start=2",
                 "--set", "feat_weight=0.1", "--set", "disc_channels=8", "--set", "disc_layers=2",
                 "--set", "quantizer=vq", "--set", "rec_loss=l2", steps=4) == 0
    recs = [r for r in read_metrics(tmp_path / "gan") if "train/loss" in r]
    assert "train/g_adv" not in recs[0] and recs[0]["step"] == 1  # warm-up: no GAN yet
    last = recs[-1]
    assert {"train/g_adv", "train/d_loss", "train/d_weight", "train/feat", "train/commit"} <= set(last)
    assert last["train/d_weight"] > 0


def test_ddp_two_cpu_processes_keep_identical_codebooks(image_data, tmp_path):
    """torchrun, gloo, 2 ranks, the vq quantizer (whose EMA codebook and dead-code swaps must be synced)
    and the GAN."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tessera", "tokenizer", "train", "image", "--data", str(image_data), "--out", str(tmp_path / "ddp"),
           "--max-steps", "4", "--no-progress", "--device", "cpu",
           *[a for s in MICRO_SET for a in ("--set", s)], "--set", "quantizer=vq", "--set", "vq_dead_code_threshold=4",
           # the GAN from step 2: the adaptive weight's autograd.grad through DDP, the discriminator's own DDP
           "--set", "disc_weight=0.5", "--set", "disc_start=2", "--set", "disc_channels=8", "--set", "disc_layers=2"]
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 4
    sums = summary["rank_checksums"]
    assert len(sums) == 2 and sums[0]["quantizer"] == sums[1]["quantizer"] and sums[0]["model"] == sums[1]["model"]
    assert summary["ranks_in_sync"] is True
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step_000004" / "state.json").read_text())
    assert set(state["rng"]) == {"0", "1"} and set(state["ranks"]) == {"0", "1"}  # every rank's RNG
    codec = ImageCodec.load(tmp_path / "ddp")
    assert codec.config.quantizer == "vq"


# ------------------------------------------------------------------------------------------ evaluation
def test_eval_cli_prints_json_and_a_table(image_data, tmp_path, capsys):
    assert train(image_data, tmp_path / "run", steps=2) == 0
    capsys.readouterr()
    args = ["tokenizer", "eval", "image", "--codec", str(tmp_path / "run"), "--data", str(image_data / "test")]
    assert cli(args + ["--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"psnr", "ssim", "bpp", "codebook_usage", "n_images", "jpeg"} <= set(r)
    assert r["n_images"] == 4 and r["bpp"] == pytest.approx(math.log2(1000) / 64)
    assert [j["quality"] for j in r["jpeg"]] == [1, 5, 10, 25]
    assert all(j["bpp"] > 0 and j["psnr"] > 5 for j in r["jpeg"])
    assert r["jpeg"][0]["psnr"] < r["jpeg"][-1]["psnr"]  # higher quality, higher fidelity
    assert cli(args + ["--native", "--size", "16"]) == 0
    table = capsys.readouterr().out
    assert "JPEG q=25" in table and "codec" in table and "PSNR" in table


def test_eval_takes_a_judge_and_scores_the_files_it_labels(image_data, tmp_path, capsys):
    """The judge is an argument (the command line's is the digits corpus's): its accuracy on originals and
    reconstructions, over the files it has a label for; none labelled is a one-line error."""
    import argparse

    from fixtures import ScriptedJudge

    from tessera.unimodal import image_eval
    from tessera.unimodal.protocol import MediaJudge

    assert train(image_data, tmp_path / "run", steps=1) == 0
    p = argparse.ArgumentParser()
    image_eval.add_eval_arguments(p)
    args = p.parse_args(["--codec", str(tmp_path / "run"), "--data", str(image_data / "test"), "--json", "--no-jpeg"])
    files = sorted((image_data / "test").iterdir())
    judge = ScriptedJudge({files[0]: 0, files[1]: 1, files[2]: 0})  # files[3] has no label
    assert isinstance(judge, MediaJudge)
    capsys.readouterr()
    assert image_eval.run_eval(args, judge=judge) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["judge"] == {"accuracy_original": pytest.approx(2 / 3, abs=1e-4),
                          "accuracy_reconstructed": pytest.approx(2 / 3, abs=1e-4), "ratio": 1.0, "n": 3}
    assert judge.seen == [(3, {}), (3, {})]  # the originals, then the reconstructions
    with pytest.raises(TesseraError, match="none of the evaluated images is in the scripted labels"):
        image_eval.run_eval(args, judge=ScriptedJudge({}))


def test_the_multimodal_tokenizer_uses_the_trained_codec(image_data, tmp_path, text_dir):
    from tessera.tokenizers import build_bundle, load_bundle

    assert train(image_data, tmp_path / "run", steps=1) == 0
    build_bundle(tmp_path / "bundle", text_dir, image=tmp_path / "run")
    tok = load_bundle(tmp_path / "bundle")
    ids = tok.encode(["a drawing", Image.new("RGB", (30, 17), (200, 10, 10))])
    segs = tok.decode(ids)
    assert isinstance(segs[-1], Image.Image) and segs[-1].size == (32, 16)  # sizes rounded to multiples of 8


# ------------------------------------------------------------------------------------------------- slow
def digit_images(out: Path) -> Path:
    """The digits corpus's images (32 px, every 6th held out), built without the speech part."""
    from sklearn.datasets import load_digits

    from tessera.data.digits import digit_image

    digits = load_digits()
    for i, a in enumerate(digits.images):
        split = "test" if i % 6 == 5 else "train"
        (out / split).mkdir(parents=True, exist_ok=True)
        digit_image(a, 32).save(out / split / f"{i:04d}.png")
    return out


@pytest.mark.slow
def test_tiny_preset_on_digits_reaches_25_db_in_five_minutes(tmp_path):
    data = digit_images(tmp_path / "digits")
    assert cli(["tokenizer", "train", "image", "--data", str(data), "--out", str(tmp_path / "run"),
                "--preset", "tiny", "--max-minutes", "5", "--no-progress"]) == 0
    ev = json.loads((tmp_path / "run" / "train_summary.json").read_text())["eval"]
    assert ev["n_images"] == 299
    assert ev["psnr"] >= 25.0 and ev["codebook_usage"] >= 0.5, ev


def test_a_time_budget_alone_sizes_the_lr_schedule_and_the_bar(image_data, tmp_path, monkeypatch):
    """--max-minutes only: warmup, cooldown and the progress bar follow the steps that fit (a fake clock
    makes every step take 100 ms: 1.2 s fit 12 steps), and the summary records the plan."""
    from fixtures import step_clock

    from tessera.unimodal import codec_train

    steps, bars = step_clock(monkeypatch, codec_train, "lr_factor")
    run = tmp_path / "timed"
    assert cli(["tokenizer", "train", "image", "--data", str(image_data), "--out", str(run), "--max-minutes", "0.02",
                "--no-progress", *[a for s in MICRO_SET for a in ("--set", s)], "--set", "warmup_steps=50",
                "--set", "cooldown=0.5"]) == 0
    summary = json.loads((run / "train_summary.json").read_text())
    lrs = [r["lr"] for r in read_metrics(run) if "train/loss" in r]
    assert summary["stopped_by"] == "max_minutes" and abs(summary["step"] - 12) <= 1
    assert max(lrs) > 0.9 * 2e-3  # the warmup takes a tenth of the 12 planned steps, not 50
    assert summary["planned_steps"] == summary["step"] and bars[0].bar.total == summary["step"]
    assert lrs[-2] == pytest.approx(2 * lrs[-1])  # the linear cooldown reaches 0 as the time runs out
