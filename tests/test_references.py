"""Every reference points at something the reader has: the paper (section, equation, table) or a public repository,
commit and file, never a porting note that is not in the repository."""
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# "spec" as a document ("the spec", "spec §1.5", "spec ``gumbel_matrix.md``", "(spec §0.3)", "specs/..."); not a
# Python name: `spec = ...`, `spec(...)`, `spec[0]`, `spec.loader`, `for name, spec in ...`, `spec_from_file_location`.
DOCUMENT_REFERENCE = re.compile(r"\bthe\s+specs?\b|\bspecs?(?:'s)?\b(?!\s*(?:[=(\[\].,:)]|in\s))", re.IGNORECASE)


def tracked_text_files():
    """(path, text) of every tracked text file outside tests/; skipped outside a git checkout."""
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    for name in filter(None, names.decode().split("\0")):
        path = REPO / name
        if name.startswith("tests/") or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue
        try:
            yield name, data.decode("utf-8")
        except UnicodeDecodeError:
            continue


@pytest.mark.parametrize("text", ["(spec §1.5, steps 1-7)", "see the spec.", "spec ``gumbel_matrix.md`` §3",
                                  "the spec's §5 proposal", "as Spec §0.3 says", "spec\n``gumbel_matrix.md``"])
def test_a_document_reference_is_found(text):
    assert DOCUMENT_REFERENCE.search(text)


@pytest.mark.parametrize("text", ["spec = importlib.util.spec_from_file_location(name, path)", "spec.loader.exec_module(m)",
                                  "[name for name, spec in schema.items() if spec[0] is dict]", "inspect.signature(f)",
                                  "--help text", "specific, special, respect", "make_spec(x)", "spec: dict"])
def test_a_python_name_is_not_a_document_reference(text):
    assert not DOCUMENT_REFERENCE.search(text)


def test_no_tracked_file_refers_to_a_document_the_reader_does_not_have():
    found = [f"{name}:{text.count(chr(10), 0, match.start()) + 1}: {match.group(0)!r}"
             for name, text in tracked_text_files() for match in DOCUMENT_REFERENCE.finditer(text)]
    assert not found, "cite the paper or the reference repository, commit and file instead:\n" + "\n".join(found)
