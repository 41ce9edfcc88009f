"""``--source tfds --dataset NAME``: prepared tensorflow-datasets datasets, read by tfds.

Every dataset here is prepared in the test with tfds' own API
(``tfds.dataset_builders.store_as_tfds_dataset``), offline: a 28x28x1 one under the catalog
name ``fashion_mnist`` (made of MNIST examples: there is no Fashion-MNIST here), a small
32x32x3 one, and ones whose features or sizes rnnjax must refuse. Catalog names with no
data are read through ``tfds.testing.mock_data``.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from rnnjax.cli import main
from rnnjax.config import Config, ConfigError
from rnnjax.data.idx import FILES, Arrays, write_idx
from rnnjax.data.sources import load_dataset
from rnnjax.data.spec import DataSpec
from rnnjax.loop import train_and_evaluate

tfds = pytest.importorskip("tensorflow_datasets")
tf = pytest.importorskip("tensorflow")

N_TRAIN, N_TEST = 400, 100
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot"]


def store(name: str, data_dir: Path, features, splits: dict, version: str = "1.0.0",
          shards: int | None = None, ordered: bool = True):
    """A dataset prepared in ``data_dir`` by tfds, examples kept in the given order (or,
    not ``ordered``, shuffled by tfds when it writes them, as tfds' catalog datasets)."""
    return tfds.dataset_builders.store_as_tfds_dataset(
        name=name, version=version, features=tfds.features.FeaturesDict(features),
        split_datasets={k: tf.data.Dataset.from_tensor_slices(v) for k, v in splits.items()},
        data_dir=str(data_dir), disable_shuffling=ordered,
        download_config=tfds.download.DownloadConfig(num_shards=shards),
    )


def colour_set(n_train: int, n_test: int) -> Arrays:
    """32x32x3 images whose class (0-9) is which third of the channels and where it is
    bright: learnable in a few steps."""
    rng = np.random.default_rng(3)

    def make(n):
        labels = rng.integers(0, 10, n).astype(np.int32)
        images = rng.integers(0, 60, (n, 32, 32, 3)).astype(np.uint8)
        for i, y in enumerate(labels):
            images[i, (y % 5) * 6:(y % 5) * 6 + 6, :, y // 5 + 1] = 250
        return images, labels

    return Arrays(*make(n_train), *make(n_test))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mnist):
    """A tfds data dir holding the datasets of these tests, and the arrays they hold."""
    root = tmp_path_factory.mktemp("tfds_prepared")
    tfds_dir = root / "tfds"
    small = Arrays(mnist.train_images[:N_TRAIN], mnist.train_labels[:N_TRAIN],
                   mnist.test_images[:N_TEST], mnist.test_labels[:N_TEST])
    grey = {"image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(names=FASHION)}
    store("fashion_mnist", tfds_dir, grey, {
        "train": {"image": small.train_images[..., None], "label": small.train_labels},
        "test": {"image": small.test_images[..., None], "label": small.test_labels},
    }, version="3.0.1", shards=4)  # several shards: their order is the stored order too
    assert tfds.builder("fashion_mnist", data_dir=str(tfds_dir)).info.splits["train"] \
        .num_shards == 4
    colour = colour_set(200, 60)
    store("tiny_colour", tfds_dir, {"image": tfds.features.Image(shape=(32, 32, 3)),
                                    "label": tfds.features.ClassLabel(num_classes=10)}, {
        "train": {"image": colour.train_images, "label": colour.train_labels},
        "test": {"image": colour.test_images, "label": colour.test_labels},
    })  # no supervised keys (store_as_tfds_dataset sets none): the features by name
    four = np.zeros((4, 160, 160, 1), np.uint8)
    store("large_images", tfds_dir, {"image": tfds.features.Image(shape=(160, 160, 1)),
                                     "label": tfds.features.ClassLabel(num_classes=2)},
          {"train": {"image": four, "label": np.array([0, 1, 0, 1])},
           "test": {"image": four, "label": np.array([0, 1, 0, 1])}})
    store("writer_shuffled", tfds_dir, grey, {
        "train": {"image": small.train_images[..., None], "label": small.train_labels},
        "test": {"image": small.test_images[..., None], "label": small.test_labels},
    }, shards=4, ordered=False)
    store("deep_images", tfds_dir, {"image": tfds.features.Image(shape=(28, 28, 1),
                                                                 dtype=np.uint16),
                                    "label": tfds.features.ClassLabel(num_classes=2)},
          {"train": {"image": four[:, :28, :28].astype(np.uint16), "label": [0, 1, 0, 1]},
           "test": {"image": four[:, :28, :28].astype(np.uint16), "label": [0, 1, 0, 1]}})
    store("text_only", tfds_dir, {"text": tfds.features.Text(),
                                  "label": tfds.features.ClassLabel(num_classes=2)},
          {"train": {"text": ["a", "b"], "label": [0, 1]},
           "test": {"text": ["a", "b"], "label": [0, 1]}})
    store("integer_labels", tfds_dir, {"image": tfds.features.Image(shape=(28, 28, 1)),
                                       "label": tfds.features.Tensor(shape=(), dtype=np.int64)},
          {"train": {"image": four[:, :28, :28], "label": [0, 1, 0, 1]},
           "test": {"image": four[:, :28, :28], "label": [0, 1, 0, 1]}})
    idx_dir = root / "idx_small"  # the same MNIST examples as IDX files
    idx_dir.mkdir()
    for key, stem in FILES.items():
        write_idx(idx_dir / (stem + ".gz"), getattr(small, key).astype(np.uint8))
    empty = root / "empty"
    empty.mkdir()
    return tfds_dir, small, colour, idx_dir, empty


def tfds_config(prepared, dataset: str, **changes) -> Config:
    tfds_dir, _, _, _, empty = prepared
    return Config(source="tfds", dataset=dataset, tfds_dir=str(tfds_dir), data_dir=str(empty),
                  **changes)


def assert_same_arrays(got: Arrays, want: Arrays) -> None:
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)


def test_catalog_name_reads_the_prepared_dataset_in_stored_order(prepared, monkeypatch):
    """A split is read in tf.data batches of ``READ_BATCH`` (4096) examples, more than any
    split here holds: read again in batches of 64 (400 and 100 examples: 7 and 2 batches,
    the last one short), every batch is kept, in order (only the last could have been)."""
    from rnnjax.data import tfds_datasets

    _, small, _, _, _ = prepared
    loaded = load_dataset(tfds_config(prepared, "fashion_mnist"))
    assert loaded.spec == DataSpec((28, 28, 1), 10)
    assert loaded.title == "fashion_mnist:3.0.1 (tfds)"
    assert_same_arrays(loaded.arrays, small)  # uint8 [N, 28, 28], int32 [N], as IDX
    pinned = load_dataset(tfds_config(prepared, "fashion_mnist:3.0.1"))
    assert_same_arrays(pinned.arrays, small)
    assert N_TRAIN > N_TEST > 64
    monkeypatch.setattr(tfds_datasets, "READ_BATCH", 64)
    batched = load_dataset(tfds_config(prepared, "fashion_mnist"))
    assert_same_arrays(batched.arrays, small)


def test_records_come_shard_after_shard_in_file_order(prepared):
    """A dataset tfds shuffled when writing it (as its catalog datasets): rnnjax reads the
    records as they lie in the files, shard after shard, never interleaved or reshuffled."""
    tfds_dir = prepared[0]
    builder = tfds.builder("writer_shuffled", data_dir=str(tfds_dir))
    files = sorted(Path(builder.data_dir).glob("writer_shuffled-train.tfrecord-*"))
    assert len(files) == 4
    decode = builder.info.features.deserialize_example
    stored = [int(decode(r)["label"]) for f in files for r in tf.data.TFRecordDataset(str(f))]
    stored_images = np.stack([decode(r)["image"].numpy()[..., 0] for f in files
                              for r in tf.data.TFRecordDataset(str(f))])
    loaded = load_dataset(tfds_config(prepared, "writer_shuffled"))
    assert loaded.arrays.train_labels.tolist() == stored
    np.testing.assert_array_equal(loaded.arrays.train_images, stored_images)
    assert stored != prepared[1].train_labels.tolist()  # tfds did shuffle them


def test_named_features_of_any_image_shape(prepared):
    _, _, colour, _, _ = prepared
    loaded = load_dataset(tfds_config(prepared, "tiny_colour"))
    assert loaded.spec == DataSpec((32, 32, 3), 10)
    assert_same_arrays(loaded.arrays, colour)  # uint8 [N, 32, 32, 3]


def test_other_splits_by_flag(prepared):
    _, small, _, _, _ = prepared
    loaded = load_dataset(tfds_config(prepared, "fashion_mnist", train_split="train[:300]",
                                      test_split="train[300:]"))
    np.testing.assert_array_equal(loaded.arrays.train_images, small.train_images[:300])
    np.testing.assert_array_equal(loaded.arrays.test_labels, small.train_labels[300:])


def history(result) -> list[tuple[float, float]]:
    return [(h["test_loss"], h["test_accuracy"]) for h in result.history]


def test_prepared_fashion_mnist_trains_like_its_idx_files(prepared):
    """The same examples as a prepared tfds dataset and as IDX files train bitwise alike,
    on both feeds."""
    _, _, _, idx_dir, _ = prepared
    base = dict(steps=30, eval_every=10, batch_size=20, hidden_size=16, steps_per_call=7)
    idx = train_and_evaluate(Config(dataset=str(idx_dir), **base),
                             out=io.StringIO())
    for feed in ("device", "stream"):
        out = io.StringIO()
        got = train_and_evaluate(tfds_config(prepared, "fashion_mnist", feed=feed, **base),
                                 out=out)
        assert out.getvalue().count("test accuracy:") == 4 + 1  # 4 evaluations + summary
        if feed == "device":
            assert history(got) == history(idx)
            jax.tree.map(np.testing.assert_array_equal, got.state.params, idx.state.params)
        else:  # one step per call: the same batches, float sums in another order
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         got.state.params, idx.state.params)


def test_colour_images_train_by_rows_on_both_feeds(prepared, tmp_path, capsys):
    base = dict(steps=40, eval_every=20, batch_size=20, hidden_size=32, steps_per_call=10,
                learning_rate=0.01)
    device = train_and_evaluate(tfds_config(prepared, "tiny_colour", **base), tmp_path / "run",
                                out=io.StringIO())
    assert device.state.params["rnn"][0]["kernel"].shape == (96, 32)  # F = W*C = 32*3
    assert device.summary["final_test_accuracy"] > 0.5  # chance is 0.1
    stream = train_and_evaluate(tfds_config(prepared, "tiny_colour", feed="stream", **base),
                                out=io.StringIO())
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 device.state.params, stream.state.params)
    # The checkpoint records the image shape: eval rebuilds the 32x32x3 model.
    from rnnjax import inference

    loaded = inference.load(tmp_path / "run")
    assert loaded.spec == DataSpec((32, 32, 3), 10)
    # Its test set alone, in a dataset of no train split: eval reads that split only (it
    # had named --train-split, a flag eval lacks).
    colour = prepared[2]
    store("colour_test_only", tmp_path / "tfds", {
        "image": tfds.features.Image(shape=(32, 32, 3)),
        "label": tfds.features.ClassLabel(num_classes=10)},
        {"test": {"image": colour.test_images, "label": colour.test_labels}})
    from rnnjax.cli import main

    assert main(["eval", str(tmp_path / "run"), "--dataset", "colour_test_only",
                 "--tfds-dir", str(tmp_path / "tfds"), "--out", str(tmp_path / "cm.png")]) == 0
    # predict --as-is: image files of the dataset's own images, read as they are
    from PIL import Image

    from rnnjax.inference import probabilities

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"colour{i}.png")
        Image.fromarray(colour.test_images[i]).save(paths[-1])
    expected = probabilities(loaded, colour.test_images[:4]).argmax(axis=1)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), "--as-is", *map(str, paths)]) == 0
    rows = capsys.readouterr().out.splitlines()[1:]
    assert [int(row.split()[1]) for row in rows] == expected.tolist()
    assert main(["predict", str(tmp_path / "run"), *map(str, paths)]) == 2
    assert "--as-is (files of its images' size, grey or RGB)" in capsys.readouterr().err
    Image.fromarray(colour.test_images[0][:28, :28]).save(tmp_path / "small.png")
    assert main(["predict", str(tmp_path / "run"), "--as-is", str(tmp_path / "small.png")]) == 2
    err = capsys.readouterr().err
    assert "small.png: 28x28 pixels; --as-is reads the model's own 32x32 images as they are" \
        in err and err.count("\n") == 1


def test_the_tuner_times_the_datasets_own_images(prepared, tmp_path, monkeypatch):
    """rnnjax train tunes a tfds dataset at its images' shape, not MNIST's: the children get
    its spec (here 32x32x3, so 32 rows of 96), and the dataset is read once for both."""
    from rnnjax import tune
    from rnnjax.data import sources

    seen, reads = [], []

    def child(config, flags, candidates, deadline, steps, reference, call_s, log, **kw):
        seen.append(kw["data"])
        return tune.Child(device=None)  # nothing timed: the defaults stay

    read = sources.load_dataset
    monkeypatch.setattr(sources, "load_dataset", lambda c: reads.append(c) or read(c))
    monkeypatch.setattr(tune, "run_child", child)
    monkeypatch.delenv(tune.ENV_VAR, raising=False)  # tuning on
    tfds_dir, _, _, _, empty = prepared
    code = main(["train", "--source", "tfds", "--dataset", "tiny_colour", "--tfds-dir",
                 str(tfds_dir), "--data-dir", str(empty), "--steps", "2", "--eval-every", "2",
                 "--hidden-size", "4", "--batch-size", "4", "--tune-budget", "5",
                 "--compile-cache", str(tmp_path / "jax")])
    assert code == 0 and seen == [DataSpec((32, 32, 3), 10)] and len(reads) == 1
    assert tune.key(Config(), frozenset(), spec=seen[0])["model"]["input"] == [32, 96]


def test_rnnjax_tune_reads_the_datasets_shape_and_no_example(prepared, tmp_path, monkeypatch,
                                                              capsys):
    """rnnjax tune times synthetic images of the dataset's shape: it takes the spec from
    the builder's metadata and never reads the splits (a large dataset's minutes)."""
    from rnnjax import tune
    from rnnjax.data import tfds_datasets

    seen = []

    def child(config, flags, candidates, deadline, steps, reference, call_s, log, **kw):
        seen.append(kw["data"])
        return tune.Child(device=None)

    def never(config):
        raise AssertionError("rnnjax tune read the dataset")

    monkeypatch.setattr(tfds_datasets, "load", never)
    monkeypatch.setattr(tune, "run_child", child)
    tfds_dir, _, _, _, empty = prepared
    for dataset, spec in (("tiny_colour", DataSpec((32, 32, 3), 10)),
                          ("fashion_mnist", DataSpec((28, 28, 1), 10))):
        seen.clear()
        code = main(["tune", "--source", "tfds", "--dataset", dataset, "--tfds-dir",
                     str(tfds_dir), "--data-dir", str(empty), "--hidden-size", "4",
                     "--batch-size", "4", "--tune-budget", "5",
                     "--compile-cache", str(tmp_path / "jax")])
        assert code == 1 and seen == [spec]  # nothing timed by the fake child: exit 1
    # The split flags are checked as a run checks them, still reading nothing: a prepared
    # dataset's against its splits, IDX files' (MNIST inside rnnjax: no --data-dir, which
    # would have to hold mnist/) against theirs.
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/rnnjax_data/mnist
    for dataset, message in (("tiny_colour", "has no such split"),
                             ("mnist", "the IDX files of mnist have no split nope")):
        seen.clear()
        code = main(["tune", "--source", "tfds", "--dataset", dataset, "--tfds-dir",
                     str(tfds_dir), "--test-split", "nope",
                     "--compile-cache", str(tmp_path / "jax")])
        err = capsys.readouterr().err
        assert code == 2 and "--test-split nope" in err and message in err and not seen


def test_catalog_names_through_mock_data(prepared):
    config = tfds_config(prepared, "cifar10", steps=3, eval_every=2, batch_size=8,
                         hidden_size=8)
    with tfds.testing.mock_data(num_examples=24):
        loaded = load_dataset(config)
        assert loaded.spec == DataSpec((32, 32, 3), 10)
        assert loaded.arrays.train_images.shape == (24, 32, 32, 3)
        assert loaded.arrays.train_images.dtype == np.uint8
        result = train_and_evaluate(config, out=io.StringIO())
    assert result.state.params["rnn"][0]["kernel"].shape == (96, 8)


def test_idx_names_keep_their_rnnjax_idx_build(prepared, tmp_path):
    """A name with no prepared tfds dataset but IDX files is read as before (rnnjax_idx)."""
    _, small, _, idx_dir, _ = prepared
    config = Config(source="tfds", dataset="idx_small", data_dir=str(idx_dir.parent),
                    tfds_dir=str(tmp_path / "tfds"))
    loaded = load_dataset(config)
    assert_same_arrays(loaded.arrays, small)
    assert len(list((tmp_path / "tfds" / "rnnjax_idx").glob("idx_small_*/1.0.0"))) == 1


def test_a_run_of_idx_files_through_tfds_leaves_no_temporary(prepared, tmp_path,
                                                              monkeypatch):
    """tfds makes an empty temporary directory for every builder of a dataset not prepared
    (here the catalog's ``kmnist``, looked up first, and the ``rnnjax_idx`` build before it
    is made) and never removes it: each run left one or two in /tmp. None is left now, by
    the first run (which builds) or a later one."""
    _, small, _, idx_dir, _ = prepared
    shutil.copytree(idx_dir, tmp_path / "data" / "kmnist")
    temporaries = tmp_path / "tmp"
    temporaries.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporaries))
    config = Config(source="tfds", dataset="kmnist", data_dir=str(tmp_path / "data"),
                    tfds_dir=str(tmp_path / "tfds"))
    for _ in range(2):
        assert_same_arrays(load_dataset(config).arrays, small)
        assert not list(temporaries.iterdir())
    assert tempfile.gettempdir() == str(temporaries)  # given back as it was


def test_a_prepared_dataset_reads_where_no_temporary_directory_can_be_made(
        prepared, tmp_path, monkeypatch):
    """It needs none: a temporary directory rnnjax cannot make for tfds is no error."""
    (tmp_path / "a_file").write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "a_file" / "tmp"))
    loaded = load_dataset(tfds_config(prepared, "fashion_mnist"))
    assert_same_arrays(loaded.arrays, prepared[1])


def test_tfds_keeps_its_temporaries_where_it_may_read_its_bucket(tmp_path, monkeypatch):
    """With tfds' GCS access turned on, a builder keeps reading the metadata it copied into
    its temporary directory: that directory is not rnnjax's to remove."""
    from rnnjax.data.tfds_mnist import own_temporaries

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with own_temporaries():
        assert tempfile.gettempdir() != str(tmp_path)
    monkeypatch.setattr(tfds.core.utils.gcs_utils, "_is_gcs_disabled", False)
    with own_temporaries():
        assert tempfile.gettempdir() == str(tmp_path)


@pytest.mark.parametrize("flag", ["train_split", "test_split"])
def test_an_empty_split_of_idx_files_is_named(prepared, tmp_path, flag):
    _, _, _, idx_dir, _ = prepared
    config = Config(source="tfds", dataset=str(idx_dir), tfds_dir=str(tmp_path / "tfds"),
                    **{flag: "test[:0]" if flag == "test_split" else "train[:0]"})
    option = "--" + flag.replace("_", "-")
    with pytest.raises(ConfigError, match=rf"^{option} t\w+\[:0\]: the split of "
                                          r"rnnjax_idx:1.0.0 is empty; pass a split"):
        load_dataset(config)


def test_a_bare_name_is_never_a_directory_of_the_working_directory(prepared, monkeypatch):
    """``--source tfds --dataset idx_small`` where ``./idx_small`` holds IDX files is still
    a name (here neither prepared nor under --data-dir); ``./idx_small`` is the directory."""
    from rnnjax.data import tfds_datasets

    _, _, _, idx_dir, _ = prepared
    monkeypatch.chdir(idx_dir.parent)
    with pytest.raises(ConfigError, match="--dataset idx_small: not prepared in the tfds"):
        tfds_datasets.resolve(tfds_config(prepared, "idx_small"))
    target = tfds_datasets.resolve(tfds_config(prepared, "./idx_small"))
    assert isinstance(target, tfds_datasets.IdxBuild) and target.checksums is None
    assert target.directory.resolve() == idx_dir.resolve()


# (id, dataset, extra flags, fragments of the one-line error)
ERRORS = [
    ("not_prepared", "cifar10", [],
     ["--dataset cifar10: not prepared in the tfds data dir {tfds}", "tfds looked for "
      "{tfds}/cifar10/3.0.2", "`tfds build cifar10 --data_dir {tfds}`", "--tfds-download"]),
    ("unknown_name", "no_such_set", [],
     ["--dataset no_such_set: not prepared in the tfds data dir {tfds} and not a dataset of "
      "tfds' catalog", "tfds build no_such_set --data_dir {tfds}"]),
    ("version_missing", "fashion_mnist:9.9.9", [],
     ["--dataset fashion_mnist:9.9.9: tfds cannot open it", "only: 3.0.1"]),
    ("not_an_image", "text_only", [],
     ["--dataset text_only: features ['label', 'text'] have no 'image' and 'label'",
      "rnnjax reads an image (fixed HxWxC, uint8) and a class label (ClassLabel)"]),
    ("image_not_uint8", "deep_images", [],  # else a traceback from normalize_images
     ["--dataset deep_images: 'image' is Image(", "dtype=uint16", "images of varying size or "
      "not uint8; resize them to one size as uint8 first"]),
    ("label_not_a_class_label", "integer_labels", [],
     ["--dataset integer_labels: 'label' is Tensor", "not a ClassLabel"]),
    ("split_missing", "fashion_mnist", ["--test-split", "validation"],
     ["--test-split validation: fashion_mnist:3.0.1 has no such split (it has train, test)"]),
    ("image_too_long_for_pixels", "large_images", ["--order", "pixels"],
     ["--order pixels: 160x160x1 images are 25600 time steps of 1, more than the 16384",
      "use --order rows (160 steps of 160)"]),
    ("num_classes_check", "tiny_colour", ["--num-classes", "7"],
     ["--num-classes 7 but the dataset has 10 classes; pass --num-classes 10"]),
    ("version_not_prepared", "tiny_colour:2.0.0", [],
     ["--dataset tiny_colour:2.0.0: the tfds data dir {tfds} holds tiny_colour in version "
      "1.0.0 only; pass one of them, or the name alone for its latest"]),
    ("empty_test_split", "fashion_mnist", ["--test-split", "test[:0]"],
     ["--test-split test[:0]: the split of fashion_mnist:3.0.1 is empty; pass a split that "
      "holds examples"]),
    ("empty_train_split", "fashion_mnist", ["--train-split", "train[5:5]"],
     ["--train-split train[5:5]: the split of fashion_mnist:3.0.1 is empty; pass a split "
      "that holds examples"]),
]


@pytest.mark.parametrize(("dataset", "flags", "fragments"), [e[1:] for e in ERRORS],
                         ids=[e[0] for e in ERRORS])
def test_bad_dataset_is_one_line_and_nothing_written(capsys, prepared, tmp_path, dataset, flags,
                                                     fragments):
    tfds_dir, _, _, _, empty = prepared
    before = sorted(p.relative_to(tfds_dir) for p in tfds_dir.rglob("*"))
    work = tmp_path / "run"
    code = main(["train", "--source", "tfds", "--dataset", dataset, "--tfds-dir", str(tfds_dir),
                 "--data-dir", str(empty), "--workdir", str(work), "--steps", "2",
                 "--batch-size", "2", "--compile-cache", "off", *flags])
    captured = capsys.readouterr()
    err = captured.err.splitlines()[-1] if captured.err else ""
    assert code == 2, captured
    assert captured.err.endswith(err + "\n") and err.startswith("rnnjax: error: ")
    assert "rnnjax: error:" not in captured.err[:-len(err) - 1]
    for fragment in fragments:
        assert fragment.replace("{tfds}", str(tfds_dir)) in err, err
    assert "step " not in captured.out and not work.exists()
    assert sorted(p.relative_to(tfds_dir) for p in tfds_dir.rglob("*")) == before


def test_a_dataset_not_prepared_is_one_line_of_the_programs_stderr(tmp_path):
    """The program's whole stderr (pytest's in-process capture misses absl's logging): tfds'
    "WARNING:absl:Variant folder ... has no dataset_info.json" came before the line."""
    proc = subprocess.run(
        [sys.executable, "-m", "rnnjax", "train", "--source", "tfds", "--dataset", "cifar10",
         "--tfds-dir", str(tmp_path), "--steps", "1", "--no-tune"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"rnnjax: error: --dataset cifar10: not prepared in the tfds "
                                  f"data dir {tmp_path}") and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_download_unless_asked(prepared, monkeypatch):
    """A catalog dataset that is not prepared is not downloaded; --tfds-download asks tfds."""
    calls = []

    def download_and_prepare(self, *args, **kwargs):
        calls.append(self.name)
        raise OSError("no network here")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        download_and_prepare)
    with pytest.raises(ConfigError, match="not prepared in the tfds data dir"):
        load_dataset(tfds_config(prepared, "mnist_corrupted"))
    assert calls == []
    with pytest.raises(ConfigError, match=r"--tfds-download: tfds could not download and "
                                          r"prepare mnist_corrupted.*no network here"):
        load_dataset(tfds_config(prepared, "mnist_corrupted", tfds_download=True))
    assert calls == ["mnist_corrupted"]


def test_whether_a_dataset_is_prepared_is_asked_once_a_read(prepared, monkeypatch):
    """tfds' ``is_prepared`` reads the data dir: the spec and the load each ask it once,
    where they asked it two or three times."""
    from rnnjax.data import tfds_datasets

    asked = []
    is_prepared = tfds.core.DatasetBuilder.is_prepared

    def counted(self):
        asked.append(self.name)
        return is_prepared(self)

    monkeypatch.setattr(tfds.core.DatasetBuilder, "is_prepared", counted)
    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                        lambda self, *a, **k: None)
    config = tfds_config(prepared, "fashion_mnist", tfds_download=True)
    assert tfds_datasets.spec(config).image_shape == (28, 28, 1)
    assert asked == ["fashion_mnist"]
    assert load_dataset(config).arrays.test_images.shape == (N_TEST, 28, 28)
    assert asked == ["fashion_mnist"] * 2


@pytest.mark.parametrize("damage", ["empty info", "no info", "empty features"])
def test_a_prepared_dataset_with_damaged_metadata_is_one_line(capsys, prepared, tmp_path,
                                                              damage):
    """A prepared dataset's dataset_info.json emptied (a full disk, a cut copy) or missing
    was a traceback and exit 1; a damaged features.json was told to pass another version."""
    import shutil

    tfds_dir, _, _, _, empty = prepared
    copy = tmp_path / "tfds"
    shutil.copytree(tfds_dir / "tiny_colour", copy / "tiny_colour")
    name = {"empty info": "dataset_info.json", "no info": "dataset_info.json",
            "empty features": "features.json"}[damage]
    target = copy / "tiny_colour" / "1.0.0" / name
    target.unlink() if damage == "no info" else target.write_text("")
    code = main(["train", "--source", "tfds", "--dataset", "tiny_colour", "--tfds-dir",
                 str(copy), "--data-dir", str(empty), "--workdir", str(tmp_path / "run"),
                 "--steps", "2", "--batch-size", "2", "--compile-cache", "off"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert code == 2, err
    assert err.startswith(f"rnnjax: error: --dataset tiny_colour: its prepared metadata in "
                          f"{copy}/tiny_colour is damaged ("), err
    assert err.endswith("); prepare it there again (delete that version's directory first)")
    assert not (tmp_path / "run").exists()



def test_eval_finds_a_tfds_run_whose_data_moved(capsys, prepared, tmp_path):
    """A checkpoint of a --source tfds run records its tfds data dir: moved, `rnnjax eval`
    was told to pass --tfds-dir, a flag it did not have. It has it now (and --tfds-download,
    which that line names too); neither is taken for a run of IDX files."""
    import shutil

    tfds_dir, _, _, _, empty = prepared
    moved = tmp_path / "tfds"
    shutil.copytree(tfds_dir / "fashion_mnist", tmp_path / "first" / "fashion_mnist")
    work = tmp_path / "run"
    assert main(["train", "--source", "tfds", "--dataset", "fashion_mnist", "--tfds-dir",
                 str(tmp_path / "first"), "--data-dir", str(empty), "--steps", "2",
                 "--batch-size", "2", "--hidden-size", "4", "--eval-every", "2",
                 "--workdir", str(work)]) == 0
    trained = capsys.readouterr().out
    (tmp_path / "first").rename(moved)
    assert main(["eval", str(work)]) == 2
    err = capsys.readouterr().err
    assert "not prepared in the tfds data dir" in err and "pass --tfds-dir" in err, err
    assert main(["eval", str(work), "--tfds-dir", str(moved)]) == 0
    out = capsys.readouterr().out
    assert f"{N_TEST} test examples" in out
    last = [line for line in trained.splitlines() if line.startswith("step ")][-1]
    # The run's own last evaluation, on the moved data: "test cost: C test accuracy: A".
    assert out.splitlines()[1] == last[last.index("test cost:"):], (out, last)
    idx_run = tmp_path / "idx"
    assert main(["train", "--steps", "1", "--hidden-size", "4", "--eval-every", "1",
                 "--workdir", str(idx_run)]) == 0
    capsys.readouterr()
    for flags in (["--tfds-dir", str(moved)], ["--tfds-download"], ["--tfds-dir", ""]):
        assert main(["eval", str(idx_run), *flags]) == 2
        err = capsys.readouterr().err
        assert err == (f"rnnjax: error: {flags[0]}: the checkpoint's run read --source idx, "
                       f"which never reads it; drop {flags[0]} (--data-dir and --dataset say "
                       "where its data is)\n"), err


def test_a_tfds_run_of_a_dataset_directory_moved_names_its_new_place(capsys, prepared,
                                                                      tmp_path):
    """A --source tfds run of --dataset PATH (IDX files built by tfds) whose directory
    moved was told "--dataset PATH: no such directory", a flag the user never passed on
    resume or eval. It is now the checkpoint's dataset that is gone, as for --source idx,
    and the run goes on from the new place."""
    _, _, _, idx_dir, empty = prepared
    shutil.copytree(idx_dir, tmp_path / "a")
    work = tmp_path / "run"
    argv = ["train", "--source", "tfds", "--tfds-dir", str(tmp_path / "tfds"), "--data-dir",
            str(empty), "--no-tune", "--hidden-size", "4", "--batch-size", "8",
            "--eval-every", "2", "--workdir", str(work), "--compile-cache", "off"]
    assert main([*argv, "--steps", "2", "--dataset", str(tmp_path / "a")]) == 0
    (tmp_path / "a").rename(tmp_path / "moved")
    capsys.readouterr()
    gone = (f"rnnjax: error: the checkpoint's dataset {tmp_path / 'a'} is gone (no such "
            "directory); if it moved, pass its new place: rnnjax ")
    for command, fix in ((["train", "--workdir", str(work), "--steps", "4", "--resume"],
                          f"train --workdir {work} --resume --dataset NEW_PLACE"),
                         (["eval", str(work)], f"eval {work} --dataset NEW_PLACE")):
        assert main(command) == 2
        assert capsys.readouterr().err == f"{gone}{fix}\n"
    assert main(["train", "--workdir", str(work), "--steps", "4", "--resume", "--dataset",
                 str(tmp_path / "moved")]) == 0
    assert main(["eval", str(work), "--dataset", str(tmp_path / "moved")]) == 0


def test_a_tfds_error_from_the_program_is_one_line(prepared, tmp_path):
    """TensorFlow's import printed its own lines on stderr (that oneDNN is on, whatever
    TF_CPP_MIN_LOG_LEVEL says) before the one-line error: the rnnjax program turns them off
    where the user has not set them (``rnnjax.process.QUIET_TENSORFLOW``)."""
    import os
    import subprocess
    import sys

    from rnnjax.process import QUIET_TENSORFLOW

    tfds_dir, _, _, _, empty = prepared
    env = {k: v for k, v in os.environ.items() if k not in QUIET_TENSORFLOW}
    proc = subprocess.run([sys.executable, "-m", "rnnjax", "train", "--source", "tfds",
                           "--dataset", "no_such_set", "--tfds-dir", str(tfds_dir),
                           "--data-dir", str(empty), "--no-tune"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("rnnjax: error: --dataset "
                                                                   "no_such_set"), proc.stderr


def test_only_a_tfds_run_of_the_program_quiets_tensorflow(monkeypatch):
    """TF_CPP_MIN_LOG_LEVEL, which XLA reads too, is set for a run that reads --source tfds
    in the rnnjax program's own process, never for another run or a library call, and
    never over the user's own value."""
    import os

    from rnnjax import cli
    from rnnjax.process import QUIET_TENSORFLOW

    for name in QUIET_TENSORFLOW:
        monkeypatch.delenv(name, raising=False)
    cli.reads_tensorflow(Config(), whole_process=True)
    cli.reads_tensorflow(Config(source="tfds"), whole_process=False)
    assert not set(QUIET_TENSORFLOW) & set(os.environ)
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    cli.reads_tensorflow(Config(source="tfds"), whole_process=True)
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0" and os.environ["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_a_data_dir_tfds_cannot_read_is_one_line(capsys, prepared, tmp_path, monkeypatch):
    """A gs:// data dir out of reach was tfds' RuntimeError (a FailedPreconditionError from
    reading its metadata), a traceback of 87 lines and exit 1."""
    _, _, _, _, empty = prepared

    def unreachable(*args, **kwargs):
        raise RuntimeError("FailedPreconditionError: Failed to construct dataset "
                           "\"fashion_mnist\": Could not resolve host: www.googleapis.com")

    monkeypatch.setattr(tfds, "builder", unreachable)
    code = main(["train", "--source", "tfds", "--dataset", "fashion_mnist", "--tfds-dir",
                 "gs://no-such-bucket/tfds", "--data-dir", str(empty), "--workdir",
                 str(tmp_path / "run"), "--steps", "2", "--no-tune"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("rnnjax: error: --dataset fashion_mnist: tfds cannot read the data "
                          "dir gs://no-such-bucket/tfds (FailedPreconditionError: "), err
    assert err.endswith("; pass --tfds-dir where it can read the dataset (network, "
                        "credentials)\n") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_users_cell_is_tried_at_the_datasets_input_width(capsys, prepared, tmp_path,
                                                            monkeypatch):
    """A cell of one's own for colour rows (96 = 32 pixels x 3 channels), which reads its
    input in pixels of 3: tried on one step before the run at the IDX layout's 28 (not a
    multiple of 3), it was refused for a dataset it fits."""
    import jax.numpy as jnp

    from rnnjax import cells
    from tests import users_cells

    def by_pixels(key, input_size):
        assert input_size % 3 == 0, f"input width {input_size} is not whole pixels of 3"
        return {"w": jnp.zeros((input_size + 8, 8))}

    monkeypatch.setitem(cells.CELLS, "colour_rows", users_cells.with_parts(init=by_pixels))
    tfds_dir = prepared[0]
    assert main(["train", "--source", "tfds", "--dataset", "tiny_colour", "--tfds-dir",
                 str(tfds_dir), "--cell", "colour_rows", "--hidden-size", "8", "--steps", "2",
                 "--batch-size", "2", "--no-tune", "--compile-cache", "off"]) == 0
    assert main(["train", "--cell", "colour_rows", "--hidden-size", "8", "--steps", "2",
                 "--no-tune", "--compile-cache", "off"]) == 2  # MNIST's rows of 28
    assert "input width 28 is not whole pixels of 3" in capsys.readouterr().err
