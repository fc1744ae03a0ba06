"""Testbed: synthetic shape scenes, an exactly invertible pixel-shuffle codec, a word-level text
stack, small Wan / SD3 DiTs trained on the scenes, and a deterministic scorer.

Public entry points: :mod:`.scenes` (``sample_scene``, ``render``), :mod:`.scorer` (``detect``,
``score``, ``psnr``, ``ssim``), :mod:`.codec` (``PixelShuffleAutoencoder``), :mod:`.text`
(``make_word_tokenizer``), :mod:`.models` (configs and ``build_testbed_pipeline``),
:mod:`.train` (``train_testbed``) and :func:`load_testbed` for the zoo.
"""

from mixdit.pipelines.testbed.load import TESTBED_MODELS, load_testbed, testbed_path

__all__ = ["TESTBED_MODELS", "load_testbed", "testbed_path"]
