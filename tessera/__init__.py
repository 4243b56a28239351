"""tessera: train and run a native, discrete-token, unified multimodal model.

    import tessera
    m = tessera.load("run/")
    m.generate("a drawing of the digit seven", output="image", cfg_scale=3.0, seed=0)

Image and audio codecs turn pixels and waveforms into codes that share one vocabulary with SentencePiece
text pieces; one decoder-only transformer reads and writes all three.
"""

from tessera.unimodal.media import Audio

__version__ = "0.1.0"
__all__ = ["Audio", "Tessera", "load", "__version__"]


def __getattr__(name):
    # The model stack imports lazily, so `import tessera` stays light for data tools.
    if name in ("load", "Tessera"):
        from tessera.model import api

        return getattr(api, name)
    raise AttributeError(f"module 'tessera' has no attribute {name!r}")
