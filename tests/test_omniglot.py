"""loaders.omniglot on a tiny fixture in the release's format (images_background / images_evaluation, <alphabet>/
characterNN/<label>_<drawer>.png, 105x105 binary PNGs written with Pillow): order of the tasks, inversion, the
seeded 50/20/30 % split per character, and the one-line errors for missing or malformed data. Offline."""
import numpy as np
import pytest
import torch
from PIL import Image

from loaders.omniglot import OMNIGLOT_ORDER, OmniglotUnavailable, alphabet_id, load_alphabet, load_omniglot, read_image

# alphabet -> (release folder, number of characters); the first three of OMNIGLOT_ORDER, from both folders
FIXTURE = {"Gujarati": ("images_background", 3), "Sylheti": ("images_evaluation", 2),
           "Arcadian": ("images_background", 2)}
PER_CHARACTER = 10


def write_png(path, image_id):
    """A 105x105 mode-"1" PNG, white background, with ``image_id + 1`` black stroke pixels (so the id can be read
    back from the inverted image)."""
    pixels = np.ones(105 * 105, dtype=bool)
    pixels[:image_id + 1] = False
    Image.fromarray(pixels.reshape(105, 105)).save(path)


def make_release(root, fixture=FIXTURE, per_character=PER_CHARACTER):
    """Writes the fixture under ``root/omniglot``; returns {png path: image id}."""
    ids, label = {}, 0
    for name, (folder, characters) in fixture.items():
        for c in range(characters):
            character = root / "omniglot" / folder / name / f"character{c + 1:02d}"
            character.mkdir(parents=True)
            label += 1
            for drawer in range(per_character):
                path = character / f"{label:04d}_{drawer + 1:02d}.png"
                ids[path] = len(ids)
                write_png(path, ids[path])
    return ids


def image_ids(images):
    return (images.flatten(1).sum(dim=1) // 255 - 1).tolist()


@pytest.fixture
def release(tmp_path):
    return tmp_path, make_release(tmp_path)


def test_order_and_alphabet_ids():
    assert len(set(OMNIGLOT_ORDER)) == 50
    assert OMNIGLOT_ORDER[:4] == ("Gujarati", "Sylheti", "Arcadian", "Tibetan")
    assert alphabet_id("Alphabet_of_the_Magi") == 0 and alphabet_id("ULOG") == 49  # tfds: sorted names
    assert sorted(alphabet_id(name) for name in OMNIGLOT_ORDER) == list(range(50))


def test_read_image_inverts_strokes(release):
    _, ids = release
    path = next(iter(ids))
    image = read_image(path)
    assert image.shape == (105, 105) and image.dtype == np.uint8
    assert image.flat[0] == 255 and image.flat[-1] == 0  # stroke = 255 (1 after / 255), background = 0
    assert set(np.unique(image)) == {0, 255}


def test_tasks_come_in_the_fixed_order_from_both_folders(release):
    root, ids = release
    data = load_omniglot(root, num_alphabets=3)
    assert data["tasks"] == ("Gujarati", "Sylheti", "Arcadian")
    assert data["num_classes"] == [3, 2, 2]
    for t, name in enumerate(data["tasks"]):
        sizes = [len(data[split][t][1]) for split in ("train", "val", "test")]
        assert sizes == [5 * FIXTURE[name][1], 2 * FIXTURE[name][1], 3 * FIXTURE[name][1]]  # 50 / 20 / 30 %
        images = torch.cat([data[split][t][0] for split in ("train", "val", "test")])
        assert images.shape[1:] == (105, 105) and images.dtype == torch.uint8
        for split in ("train", "val", "test"):
            labels = data[split][t][1]
            assert labels.dtype == torch.int64
            assert torch.equal(labels.unique(), torch.arange(FIXTURE[name][1]))  # every character in every split
    everything = [i for split in ("train", "val", "test") for t in range(3) for i in image_ids(data[split][t][0])]
    assert sorted(everything) == list(range(len(ids)))  # each image exactly once


def test_split_is_the_seeded_shuffle_of_each_character(release):
    root, ids = release
    data = load_omniglot(root, num_alphabets=3)
    for t, name in enumerate(data["tasks"]):
        rng = np.random.RandomState(alphabet_id(name))
        folder = root / "omniglot" / FIXTURE[name][0] / name
        expected = {"train": [], "val": [], "test": []}
        for character in sorted(folder.iterdir()):
            files = sorted(character.glob("*.png"))
            rng.shuffle(files)
            for split, chunk in zip(expected, (files[:5], files[5:7], files[7:])):
                expected[split] += [ids[path] for path in chunk]
        for split in expected:
            assert image_ids(data[split][t][0]) == expected[split]
    again = load_omniglot(root, num_alphabets=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(data["train"], again["train"]))


def test_data_root_from_the_environment(release, monkeypatch):
    root, _ = release
    monkeypatch.setenv("MTL_DATA_ROOT", str(root))
    assert load_omniglot(num_alphabets=1)["tasks"] == ("Gujarati",)


def test_missing_data_is_one_line_saying_where_to_put_it(tmp_path):
    with pytest.raises(OmniglotUnavailable) as err:
        load_omniglot(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "cannot be downloaded" in message
    assert str(tmp_path / "omniglot") in message and "images_background" in message


def test_missing_alphabet(tmp_path):
    make_release(tmp_path, {"Gujarati": ("images_background", 1)})
    with pytest.raises(OmniglotUnavailable, match="'Sylheti' is in neither"):
        load_omniglot(tmp_path, num_alphabets=2)


def test_malformed_data(tmp_path):
    ids = make_release(tmp_path, {"Gujarati": ("images_background", 1)})
    folder = tmp_path / "omniglot" / "images_background" / "Gujarati"
    first = next(iter(ids))
    Image.new("1", (28, 28), 1).save(first)
    with pytest.raises(OmniglotUnavailable, match="28x28, expected 105x105"):
        load_alphabet(folder, 0)
    first.write_bytes(b"not a png")
    with pytest.raises(OmniglotUnavailable, match="not a readable image"):
        load_alphabet(folder, 0)
    first.unlink()
    with pytest.raises(OmniglotUnavailable, match="9 PNG files"):
        load_alphabet(folder, 0)
    (folder / "extra").mkdir()
    with pytest.raises(OmniglotUnavailable, match="characterNN"):
        load_alphabet(folder, 0)
    with pytest.raises(ValueError, match="num_alphabets"):
        load_omniglot(tmp_path, num_alphabets=0)
