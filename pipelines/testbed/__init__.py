"""Testbed: synthetic shape scenes, an exactly invertible pixel-shuffle codec, a word-level text
stack, small Wan / SD3 DiTs trained on the scenes, and a deterministic scorer.

Public entry points: :mod:`.scenes` (``sample_scene``, ``render``), :mod:`.scorer` (``detect``,
``score``, ``psnr``, ``ssim``), :mod:`.codec` (``PixelShuffleAutoencoder``), :mod:`.text`
(``make_word_tokenizer``), :mod:`.models` (configs and ``build_testbed_pipeline``),
:mod:`.train` (``train_testbed``) and :func:`load_testbed` for the zoo.
"""

# diffusers (>= 0.42) loads a component class named in model_index.json only from a module that is
# already imported: importing this package makes saved testbed folders loadable with plain
# ``DiffusionPipeline.from_pretrained``.
from mixdit.pipelines.testbed.codec import PixelShuffleAutoencoder
from mixdit.pipelines.testbed.load import TESTBED_MODELS, load_testbed, testbed_path

__all__ = ["PixelShuffleAutoencoder", "TESTBED_MODELS", "load_testbed", "testbed_path"]
