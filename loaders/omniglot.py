"""Omniglot (Lake et al. 2015) as the 20 tasks of the Omniglot experiment of Maziarz et al. (arXiv 1910.04915,
Sec. 5.2; google-research/google-research@0c1bbe5f
``learning_parameter_allocation/data.py`` get_omniglot, get_omniglot_order).

Reads the original release's folders ``images_background/`` and ``images_evaluation/`` (unzipped
``images_background.zip`` / ``images_evaluation.zip`` of github.com/brendenlake/omniglot, ``python/``), laid out as
``<alphabet>/characterNN/<label>_<drawer>.png`` with 105x105 binary PNGs, from ``<root>/omniglot/``. The images
cannot be downloaded on this machine (no PyPI or Debian package ships them): copy the two folders there.

As the original: task k = alphabet k of ``OMNIGLOT_ORDER`` (the order of "Diversity and Depth in Per-Example
Routing Models", copied from ``get_omniglot_order``), 20 tasks by default; label = character index in the alphabet
(``characterNN`` -> NN - 1, as tfds' ``alphabet_char_id``); pixels inverted so that strokes are 1 after dividing by
255 (``make_negative``). Every character's images are split 50 / 20 / 30 % into train / val / test after a shuffle
by a numpy generator seeded with the alphabet id (tfds' id: the index of the name among the 50 sorted alphabet
names), one shuffle per character in character order, as ``np.random.seed(alphabet_id)`` + ``np.random.shuffle``.

Not reproducible offline: the order of a character's images before the shuffle (tfds' record order; here: sorted
file names), so the exact split differs. The original loads tfds' split ALL, which also contains the
``images_background_small1/2`` subsets, i.e. second copies of some background alphabets' images; here every image
is read once.
"""
import numpy as np
import torch
from PIL import Image

from .mnist import data_root

OMNIGLOT_ORDER = (
    "Gujarati", "Sylheti", "Arcadian", "Tibetan", "Old_Church_Slavonic_(Cyrillic)", "Angelic",
    "Malay_(Jawi_-_Arabic)", "Sanskrit", "Cyrillic", "Anglo-Saxon_Futhorc", "Syriac_(Estrangelo)", "Ge_ez",
    "Japanese_(katakana)", "Keble", "Manipuri", "Alphabet_of_the_Magi", "Gurmukhi", "Korean", "Early_Aramaic",
    "Atemayar_Qelisayer", "Tagalog", "Mkhedruli_(Georgian)", "Inuktitut_(Canadian_Aboriginal_Syllabics)", "Tengwar",
    "Hebrew", "N_Ko", "Grantha", "Latin", "Syriac_(Serto)", "Tifinagh", "Balinese", "Mongolian", "ULOG", "Futurama",
    "Malayalam", "Oriya", "Ojibwe_(Canadian_Aboriginal_Syllabics)", "Avesta", "Kannada", "Bengali",
    "Japanese_(hiragana)", "Armenian", "Aurek-Besh", "Glagolitic", "Asomtavruli_(Georgian)", "Greek", "Braille",
    "Burmese_(Myanmar)", "Blackfoot_(Canadian_Aboriginal_Syllabics)", "Atlantean")
FOLDERS = ("images_background", "images_evaluation")
IMAGE_SIZE = 105
SPLITS = ("train", "val", "test")
FRACTIONS = (0.5, 0.2)  # train, val; test = the rest


class OmniglotUnavailable(RuntimeError):
    """Omniglot is missing or malformed; the message is one line saying what and where to put the data."""


def alphabet_id(name):
    """tfds' id of an alphabet: its index among the 50 alphabet names sorted."""
    return sorted(OMNIGLOT_ORDER).index(name)


def omniglot_dir(root=None):
    return data_root(root) / "omniglot"


def find_alphabet(directory, name):
    """The folder of alphabet ``name`` in ``directory/images_background`` or ``directory/images_evaluation``."""
    for folder in FOLDERS:
        if (directory / folder / name).is_dir():
            return directory / folder / name
    where = " or ".join(str(directory / folder) for folder in FOLDERS)
    if not any((directory / folder).is_dir() for folder in FOLDERS):
        raise OmniglotUnavailable(
            f"Omniglot not found: no {where}. Omniglot cannot be downloaded on this machine; copy the unzipped "
            f"folders images_background/ and images_evaluation/ of the Omniglot release (layout "
            f"<alphabet>/characterNN/<png files>) into {directory}, or set MTL_DATA_ROOT / --data_root to a data root "
            f"that has them in omniglot/")
    raise OmniglotUnavailable(f"Omniglot alphabet {name!r} is in neither {where}; the first tasks need the "
                              f"alphabets {', '.join(OMNIGLOT_ORDER[:3])}, ... (both folders of the release)")


def read_image(path):
    """One 105x105 PNG as uint8 ``[105, 105]``, inverted: 255 = stroke, 0 = background."""
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
    except OSError as err:
        raise OmniglotUnavailable(f"{path}: not a readable image ({err})") from None
    if pixels.shape != (IMAGE_SIZE, IMAGE_SIZE):
        raise OmniglotUnavailable(f"{path}: image is {pixels.shape[1]}x{pixels.shape[0]}, expected "
                                  f"{IMAGE_SIZE}x{IMAGE_SIZE}")
    return 255 - pixels


def character_number(folder):
    """``characterNN`` -> NN - 1 (tfds' ``alphabet_char_id``)."""
    digits = folder.name[len("character"):]
    if not folder.name.startswith("character") or not digits.isdigit() or int(digits) < 1:
        raise OmniglotUnavailable(f"{folder}: expected a folder named characterNN (NN >= 1)")
    return int(digits) - 1


def load_alphabet(folder, seed):
    """``{split: (images uint8 [N, 105, 105], labels int64 [N])}`` (torch) of one alphabet folder, every character split
    50 / 20 / 30 % after a shuffle; one numpy generator seeded with ``seed`` shuffles the characters in order."""
    rng = np.random.RandomState(seed)
    parts = {split: ([], []) for split in SPLITS}
    characters = sorted((character_number(c), c) for c in folder.iterdir() if c.is_dir())
    if not characters:
        raise OmniglotUnavailable(f"{folder}: no characterNN folders")
    for label, character in characters:
        files = sorted(character.glob("*.png"))
        if not files or len(files) % 10:
            raise OmniglotUnavailable(f"{character}: {len(files)} PNG files; the 50/20/30 % split needs a positive "
                                      f"multiple of 10 (the release has 20)")
        rng.shuffle(files)
        train, val = (int(fraction * len(files)) for fraction in FRACTIONS)
        for split, chunk in zip(SPLITS, (files[:train], files[train:train + val], files[train + val:])):
            parts[split][0].extend(read_image(path) for path in chunk)
            parts[split][1].extend([label] * len(chunk))
    return {split: (torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64))
            for split, (images, labels) in parts.items()}


def load_omniglot(root=None, num_alphabets=20):
    """The first ``num_alphabets`` alphabets of ``OMNIGLOT_ORDER`` as tasks: ``{"tasks": names, "num_classes":
    [characters per alphabet], "train": [(images uint8 [N, 105, 105], labels int64 [N]) per task] (torch tensors,
    as ``loaders.rotated_mnist``), "val": [...],
    "test": [...]}`` (images inverted: 255 = stroke). Data root: ``root``, else ``$MTL_DATA_ROOT``, else ``./data``.
    Raises :class:`OmniglotUnavailable` (one line) if the data is missing or malformed."""
    if not 1 <= num_alphabets <= len(OMNIGLOT_ORDER):
        raise ValueError(f"num_alphabets must be in 1..{len(OMNIGLOT_ORDER)}, got {num_alphabets}")
    directory = omniglot_dir(root)
    tasks = OMNIGLOT_ORDER[:num_alphabets]
    out = {"tasks": tasks, "num_classes": [], **{split: [] for split in SPLITS}}
    for name in tasks:
        alphabet = load_alphabet(find_alphabet(directory, name), alphabet_id(name))
        out["num_classes"].append(int(alphabet["train"][1].max()) + 1)
        for split in SPLITS:
            out[split].append(alphabet[split])
    return out

