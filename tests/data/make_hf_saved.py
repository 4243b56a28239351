"""Writes tests/data/hf_saved with the `datasets` package's own save_to_disk (tessera does not depend on it).

    python -m venv /tmp/hf && /tmp/hf/bin/pip install datasets==5.2.0 pillow soundfile
    /tmp/hf/bin/python tests/data/make_hf_saved.py tests/data/hf_saved

pictures/: a DatasetDict (train: 3 rows, test: 1) of an Image feature and a caption; speech/: a Dataset of an
Audio feature (WAV bytes at 16 and 22.05 kHz) and a transcript. tests/test_readers.py rebuilds the same
pixels and samples to check that pretokenize reads what `datasets` wrote.
"""

import io
import sys

import numpy as np
import soundfile as sf
from datasets import Audio, Dataset, DatasetDict, Features, Value
from datasets import Image as HFImage
from PIL import Image


def png(seed, h, w):
    rng = np.random.default_rng(seed)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(b, format="PNG")
    return b.getvalue()


def wav(seed, n, sr):
    rng = np.random.default_rng(seed)
    b = io.BytesIO()
    sf.write(b, (0.2 * rng.standard_normal(n)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return b.getvalue()


def main(out: str) -> None:
    feats = Features({"image": HFImage(), "caption": Value("string")})
    train = Dataset.from_dict({"image": [{"bytes": png(0, 32, 32), "path": None},
                                         {"bytes": png(1, 40, 24), "path": None},
                                         {"bytes": png(2, 24, 40), "path": None}],
                               "caption": ["a first picture", "a second picture", "a third picture"]}, features=feats)
    test = Dataset.from_dict({"image": [{"bytes": png(3, 32, 32), "path": None}], "caption": ["a held-out picture"]},
                             features=feats)
    DatasetDict({"train": train, "test": test}).save_to_disk(f"{out}/pictures")
    speech = Dataset.from_dict({"audio": [{"bytes": wav(4, 6400, 16000), "path": None},
                                          {"bytes": wav(5, 4410, 22050), "path": None}],
                                "text": ["one clip", "another clip"]})
    # cast, not encode: encoding audio needs torchcodec; the stored bytes are the same
    speech.cast_column("audio", Audio(sampling_rate=16000, decode=False)).save_to_disk(f"{out}/speech")


if __name__ == "__main__":
    main(sys.argv[1])
