import subprocess
import sys


def test_import_tokenizers_is_hugging_face():
    """tessera must not shadow HF `tokenizers` (its subpackage is tessera.tokenizers)."""
    out = subprocess.run(
        [sys.executable, "-c", "import tessera, tokenizers; print(tokenizers.__file__); print(hasattr(tokenizers, 'Tokenizer'))"],
        capture_output=True, text=True, check=True,
    ).stdout.split()
    assert "tessera" not in out[0] and out[1] == "True"
