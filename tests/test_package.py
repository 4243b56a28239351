import subprocess
import sys
from pathlib import Path

import tessera

REPO = Path(tessera.__file__).resolve().parent.parent


def test_import_tokenizers_is_hugging_face():
    """tessera must not shadow HF `tokenizers` (its subpackage is tessera.tokenizers).

    Shadowing means `import tokenizers` finds a file inside the tessera package directory. The path of the
    checkout itself may well contain the word "tessera" (a clone is named so), which is no shadowing.
    """
    code = (
        "import pathlib, tessera, tokenizers; "
        "print(pathlib.Path(tokenizers.__file__).resolve()); "
        "print(pathlib.Path(tessera.__file__).resolve().parent); "
        "print(hasattr(tokenizers, 'Tokenizer'))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.splitlines()
    hf_file, package_dir, has_tokenizer = Path(out[0]), Path(out[1]), out[2]
    assert package_dir not in hf_file.parents, f"{hf_file} shadows HF tokenizers"
    assert has_tokenizer == "True"
