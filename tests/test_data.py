"""Data sets: shapes, ranges, the official CelebA crop, folder layouts, and clear errors for missing data."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from ddim.data import (DATASETS, DataSpec, DiffusionDataModule, EpochSeededSampler, SplitError, build_dataset,
                       image_grid)


def make_image_folder(root, n=6, size=(20, 24)):
    for i in range(n):
        sub = root / f"class{i % 2}"
        sub.mkdir(parents=True, exist_ok=True)
        arr = np.random.default_rng(i).integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
        Image.fromarray(arr).save(sub / f"{i}.png")
    return root


def make_fake_celeba(root, n=6):
    """The standard layout: celeba/img_align_celeba/*.jpg (178x218) + list_eval_partition.txt, no md5 files."""
    img_dir = root / "celeba" / "img_align_celeba"
    img_dir.mkdir(parents=True)
    lines = []
    for i in range(n):
        arr = np.random.default_rng(i).integers(0, 256, (218, 178, 3), dtype=np.uint8)
        name = f"{i + 1:06d}.jpg"
        Image.fromarray(arr).save(img_dir / name, quality=95)
        lines.append(f"{name} {0 if i < n - 2 else 2}")
    (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


def test_digits_shape_range_and_split():
    ds = build_dataset("digits", root="unused", image_size=16, channels=1)
    x, y = ds[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.5  # background -1, strokes bright
    assert 0 <= y <= 9
    test = build_dataset("digits", root="unused", image_size=32, channels=3, split="test")
    assert len(ds) + len(test) == 1797 and test[0][0].shape == (3, 32, 32)


def test_uniform_dequantization_stays_in_range_and_adds_noise():
    a = build_dataset("digits", root="x", image_size=8, random_flip=False, uniform_dequantization=True)
    b = build_dataset("digits", root="x", image_size=8, random_flip=False, uniform_dequantization=False)
    xa, xb = a[3][0], b[3][0]
    assert xa.min() >= -1 and xa.max() <= 1
    u = (xb + 1) / 2  # [0, 1] pixels; official: u*255/256 + U(0, 1/256), then 2x - 1
    r = ((xa + 1) / 2 - u * 255 / 256) * 256  # the uniform draws
    assert r.min() >= -1e-4 and r.max() <= 1 + 1e-4 and r.std() > 0.1


def test_image_folder(tmp_path):
    ds = build_dataset("image_folder", root=make_image_folder(tmp_path / "imgs"), image_size=16)
    assert len(ds) == 6
    x, y = ds[0]
    assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1 and y in (0, 1)


def test_celeba_official_crop(tmp_path):
    root = make_fake_celeba(tmp_path)
    ds = build_dataset("celeba", root=root, image_size=64, random_flip=False)
    assert len(ds) == 4  # partition 0 only
    assert len(build_dataset("celeba", root=root, image_size=64, split="test")) == 2
    x, _ = ds[0]
    assert x.shape == (3, 64, 64)
    # official: the 128x128 box with rows 121-64..121+64 and columns 89-64..89+64, resized to 64
    im = Image.open(root / "celeba" / "img_align_celeba" / "000001.jpg").convert("RGB")
    want = np.asarray(im.crop((25, 57, 153, 185)).resize((64, 64), Image.BILINEAR), dtype=np.float32) / 255 * 2 - 1
    got = x.permute(1, 2, 0).numpy()
    assert np.abs(got - want).mean() < 0.02


@pytest.mark.parametrize("name", ["celeba", "image_folder", "cifar10", "lsun"])
def test_missing_data_names_the_path(tmp_path, name):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        build_dataset(name, root=missing, image_size=32)
    assert str(missing) in str(e.value)


def test_cifar10_from_decoded_arrays(tmp_path):
    """<root>/cifar10_<split>.npz (x uint8 NHWC, y): images in [-1, 1] as (C, H, W), flips only with random_flip;
    a wrong image_size or missing arrays are named."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "cifar10_test.npz", x=x, y=np.arange(5, dtype=np.uint8))
    ds = build_dataset("cifar10", root=tmp_path, image_size=32, split="test", random_flip=False)
    img, label = ds[3]
    assert len(ds) == 5 and label == 3 and img.shape == (3, 32, 32)
    torch.testing.assert_close(img, torch.from_numpy(x[3]).permute(2, 0, 1).float() / 127.5 - 1.0)
    flipped = build_dataset("cifar10", root=tmp_path, image_size=32, split="test", random_flip=True)
    seen = {bool(torch.equal(flipped[3][0], img.flip(-1))) for _ in range(40)}
    assert seen == {True, False}
    with pytest.raises(ValueError, match=r"holds 32x32 images; dataset.image_size=16 \(allowed here: 32\)"):
        build_dataset("cifar10", root=tmp_path, image_size=16, split="test")
    with pytest.raises(FileNotFoundError, match=r"neither .*cifar-10-batches-py nor .*cifar10_train.npz"):
        build_dataset("cifar10", root=tmp_path, image_size=32, split="train")
    np.savez(tmp_path / "cifar10_train.npz", images=x)
    with pytest.raises(ValueError, match=r"must hold arrays x .* and y .*; it has \['images'\]"):
        build_dataset("cifar10", root=tmp_path, image_size=32, split="train")


@pytest.mark.parametrize("name, allowed", [("digits", "'train', 'test' or 'all'"), ("cifar10", "'train' or 'test'"),
                                           ("celeba", "['test', 'train', 'val', 'valid', 'all']"),
                                           ("lsun", "['test', 'train', 'val', 'valid']")])
def test_a_split_the_data_set_lacks_is_a_split_error_naming_the_allowed(tmp_path, name, allowed):
    """Raised before any file is read (evaluate.py renames it under fid.ref_split / reconstruction.split); LSUN
    once read an unknown split as the train lmdb."""
    root = make_fake_celeba(tmp_path) if name == "celeba" else tmp_path
    with pytest.raises(SplitError) as e:
        build_dataset(name, root=root, image_size=32, split="validation")
    assert allowed in str(e.value) and "'validation'" in str(e.value)


def test_a_key_no_reader_takes_is_refused():
    with pytest.raises(ValueError, match=r"dataset.typo_key is not a setting of dataset \(nothing reads it\)"):
        build_dataset("digits", image_size=8, typo_key=5)
    assert len(build_dataset("digits", image_size=8, split="test", batch_size=20, train_steps=5)) == 180


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits"):
        build_dataset("mnist", root=".", image_size=32)


def toy_dataset(root, split, image_size, random_flip, uniform_dequantization, download, channels=3,
                category="church_outdoor"):
    """A reader of four blank images, for registering a data set in a test."""
    if split != "train":
        raise SplitError(f"toy: split must be 'train', got {split!r}")
    return TensorDataset(torch.full((4, channels, image_size, image_size), -1.0), torch.arange(4))


def test_a_registered_data_set_is_read_and_evaluated_with_its_defaults(monkeypatch, tmp_path):
    """One DATASETS entry is all a new data set needs: build_dataset reads it, grey follows its DataSpec, and
    evaluate.py takes its τ, FID sample count and folder under paths.data_dir from the entry."""
    from ddim.evaluation.runner import dataset_config
    from ddim.evaluation.settings import default_trajectory
    from ddim.evaluation.tasks import fid_num_samples
    from ddim.training.checks import check_data_fits_model

    monkeypatch.setitem(DATASETS, "toy", DataSpec(toy_dataset, grey=True, data_subdir="toys", fid_samples=7,
                                                  trajectory="quadratic"))
    monkeypatch.setitem(DATASETS, "rgb_toy", DataSpec(toy_dataset))
    assert build_dataset("toy", image_size=8, channels=1)[0][0].shape == (1, 8, 8)
    with pytest.raises(SplitError, match="toy: split must be 'train'"):
        build_dataset("toy", image_size=8, split="test")
    with pytest.raises(ValueError, match=r"dataset.channels=1 for dataset=rgb_toy; allowed: 3 \(RGB\), or 1 \(grey\) "
                                         r"for digits, image_folder and toy$"):
        build_dataset("rgb_toy", image_size=8, channels=1)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; allowed: .*, toy, rgb_toy$"):
        build_dataset("mnist", image_size=8)
    dm = DiffusionDataModule(name="toy", image_size=8, channels=1, batch_size=2)
    with pytest.raises(ValueError, match=r"channels: 3, or 1 for digits, image_folder and toy\)"):
        check_data_fits_model(dm, {"in_channels": 3, "resolution": 8})
    assert default_trajectory("toy") == "quadratic" and default_trajectory("rgb_toy") == "linear"
    assert fid_num_samples({"num_samples": None}, {"name": "toy"}) == 7
    assert fid_num_samples({"num_samples": None}, {"name": "rgb_toy"}) == 50_000
    s = SimpleNamespace(dataset=None, data_dir=str(tmp_path), reads_data=True, task="fid")
    assert dataset_config(s, {"data": {"name": "toy", "image_size": 8}})["root"] == str(tmp_path / "toys")
    assert dataset_config(s, {"data": {"name": "rgb_toy", "image_size": 8}})["root"] == str(tmp_path)


def test_a_data_set_known_by_its_folder_is_recorded_and_keyed_by_it(monkeypatch, tmp_path):
    """DataSpec.by_place (image_folder's): train.py's checkpoint records the folder, evaluation keys by it, and a
    checkpoint without it is told to name it, for a new reader as for image_folder."""
    from conftest import REPO
    monkeypatch.syspath_prepend(str(REPO))
    import train
    from ddim.evaluation.runner import dataset_config
    from ddim.evaluation.settings import Loaded

    monkeypatch.setitem(DATASETS, "my_folder", DataSpec(toy_dataset, by_place=True))
    record = train.data_record({"name": "my_folder", "image_size": 8, "channels": 3, "root": str(tmp_path / "x")})
    assert record["root"] == str((tmp_path / "x").resolve())
    assert "root" not in train.data_record({"name": "digits", "image_size": 8, "channels": 1, "root": "data"})
    loaded = Loaded(None, None, {}, record, (3, 8, 8), "linear", None)
    assert loaded.data_folder == record["root"] and loaded.reference_name("train").startswith("my_folder-8-train-")
    s = SimpleNamespace(dataset=None, data_dir=str(tmp_path), reads_data=True, task="reconstruction")
    with pytest.raises(ValueError, match=r"trained on dataset=my_folder, whose folder it does not record"):
        dataset_config(s, {"data": {"name": "my_folder", "image_size": 8}})


def test_a_data_spec_refuses_a_trajectory_or_fid_count_evaluate_cannot_use():
    with pytest.raises(ValueError, match=r"DataSpec.trajectory='quad'; allowed: linear, quadratic"):
        DataSpec(toy_dataset, trajectory="quad")
    with pytest.raises(ValueError, match="DataSpec.fid_samples"):
        DataSpec(toy_dataset, fid_samples=0)


def test_batch_larger_than_dataset(tmp_path):
    dm = DiffusionDataModule(name="image_folder", root=str(make_image_folder(tmp_path / "i")), image_size=8,
                             batch_size=64)
    with pytest.raises(ValueError, match="batch_size=64 is larger than .* \\(6 images"):
        dm.setup("fit")


def test_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSeededSampler(50, seed=3), EpochSeededSampler(50, seed=3)
    first = list(a)
    a.seek(1)
    second = list(a)
    assert first != second and sorted(i for i, _ in first) == list(range(50))
    b.seek(1)
    assert list(b) == second  # a fresh (resumed) sampler at epoch 1 sees the same order and sample seeds
    seeds = [dict(first)[i] for i in range(50)], [dict(second)[i] for i in range(50)]
    assert len(set(seeds[0])) == 50 and not set(seeds[0]) & set(seeds[1])  # per image and per epoch


def _epoch_images(num_workers: int, epochs: int) -> list[tuple[torch.Tensor, list[tuple[int, int]]]]:
    """Each epoch's images as train.py's data loader gives them (digits test split, flips and dequantisation on),
    with the (index, seed) pairs the sampler gave."""
    dm = DiffusionDataModule(name="digits", image_size=8, channels=1, split="test", batch_size=20, seed=7,
                             random_flip=True, uniform_dequantization=True, num_workers=num_workers)
    dm.setup("fit")
    loader, out = dm.train_dataloader(), []
    for epoch in range(epochs):
        dm.sampler.seek(epoch)
        out.append((torch.cat([x for x, _ in loader]), list(dm.sampler)))
    return out


def test_flips_and_noise_are_the_same_for_any_number_of_workers_and_differ_between_epochs():
    """Drawn from (seed, epoch, index), not from a worker's random state: 0 and 2 workers give the same batches
    bit for bit; an image's flip changes from one epoch to the next; a run resumed mid-epoch draws the same."""
    serial, parallel = _epoch_images(0, 2), _epoch_images(2, 2)
    plain = build_dataset("digits", image_size=8, channels=1, split="test", random_flip=False)
    flips = []
    for (images, pairs), (images_2, pairs_2) in zip(serial, parallel):
        assert pairs == pairs_2 and torch.equal(images, images_2)
        flipped = {}
        for x, (i, _) in zip(images, pairs):
            straight, mirrored = (x - plain[i][0]).abs().max(), (x - plain[i][0].flip(-1)).abs().max()
            assert min(straight, mirrored) <= 2 / 256  # the image itself or its mirror, plus the noise
            flipped[i] = bool(mirrored < straight)
        flips.append(flipped)
    assert 0.3 < np.mean(list(flips[0].values())) < 0.7
    assert sum(flips[0][i] != flips[1][i] for i in flips[0]) > 40  # of 180 images, about half flip anew
    fresh = build_dataset("digits", image_size=8, channels=1, split="test", random_flip=True,
                          uniform_dequantization=True)  # as in a resumed run's new worker
    resumed = EpochSeededSampler(len(fresh), seed=7, batch_size=20)
    resumed.seek(1, 100)  # resumed at step 14, in the second epoch
    images, pairs = serial[1]
    assert list(resumed) == pairs[100:]
    assert all(torch.equal(fresh[pair][0], x) for pair, x in zip(pairs[100:120], images[100:120]))


def test_image_folder_reads_grey_with_one_channel(tmp_path):
    """dataset.channels=1 reads an image folder as grey (PIL's "L"), so a 1-channel model can train on it."""
    root = make_image_folder(tmp_path / "imgs", n=2, size=(8, 8))
    grey = build_dataset("image_folder", root=root, image_size=8, channels=1, random_flip=False)
    rgb = build_dataset("image_folder", root=root, image_size=8, channels=3, random_flip=False)
    x = grey[0][0]
    assert x.shape == (1, 8, 8) and rgb[0][0].shape == (3, 8, 8)
    with Image.open(sorted(root.rglob("*.png"))[0]) as im:
        want = torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32)) / 127.5 - 1
    assert torch.allclose(x[0], want, atol=1e-6)


def test_image_grid_enlarges_small_images_by_whole_factors():
    """Grids are for looking at: 8-pixel digits become 32-pixel squares of 4x4 equal pixels, 28-pixel images 56
    (x2, every pixel still square), 32-pixel ones stay as they are; 2-pixel white padding between."""
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    grid = image_grid(x, nrow=3)
    assert grid.shape == (3, 34 + 2, 3 * 34 + 2)
    tile = grid[0, 2:34, 2:34]
    assert torch.equal(tile, x[0, 0].repeat_interleave(4, 0).repeat_interleave(4, 1))
    assert grid[:, :2].eq(1).all() and grid[:, :, 34:36].eq(1).all()  # padding
    assert image_grid(torch.rand(2, 3, 28, 28), nrow=2).shape == (3, 56 + 4, 2 * 58 + 2)
    assert image_grid(torch.rand(2, 3, 32, 32), nrow=2).shape == (3, 32 + 4, 2 * 34 + 2)
    assert image_grid(torch.rand(2, 3, 32, 32), nrow=2, min_size=64).shape == (3, 64 + 4, 2 * 66 + 2)
