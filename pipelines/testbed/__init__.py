"""Testbed: synthetic shape scenes, an exactly invertible pixel-shuffle codec, a word-level text
stack, small Wan / SD3 DiTs trained on the scenes, and a deterministic scorer.

Public entry points: :mod:`.scenes` (``sample_scene``, ``render``), :mod:`.scorer` (``detect``,
``score``, ``psnr``, ``ssim``), :mod:`.codec` (``PixelShuffleAutoencoder``), :mod:`.text`
(``make_word_tokenizer``), :mod:`.models` (configs and ``build_testbed_pipeline``),
:mod:`.train` (``train_testbed``) and :func:`load_testbed` for the zoo.
"""

# diffusers (>= 0.42) loads a component class named in model_index.json only from a module that is
# already imported: ``import mixdit.pipelines.testbed.codec`` makes saved testbed folders loadable with
# plain ``DiffusionPipeline.from_pretrained`` (load_testbed does it). The codec imports diffusers' model
# stack (~5 s), so this package imports it only when ``PixelShuffleAutoencoder`` is asked for: the CLI
# reads the presets from here while it builds ``mixdit --help``.
from mixdit.pipelines.testbed.load import TESTBED_MODELS, load_testbed, testbed_path


def __getattr__(name):
    if name == "PixelShuffleAutoencoder":
        from mixdit.pipelines.testbed.codec import PixelShuffleAutoencoder

        return PixelShuffleAutoencoder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PixelShuffleAutoencoder", "TESTBED_MODELS", "load_testbed", "testbed_path"]
