"""Word-level tokenizer and small text encoders for the testbed, built in code (no files, no hub).

The tokenizer is a ``tokenizers`` WordLevel model over the fixed caption vocabulary
(:func:`~mixdit.pipelines.testbed.scenes.vocabulary`), wrapped as a ``transformers`` fast
tokenizer, so ``save_pretrained`` / ``from_pretrained`` work like for any hub tokenizer. ids:
0 ``<pad>``, 1 ``</s>`` (appended to every text), 2 ``<unk>`` (any word outside the vocabulary),
then the words. Text is lower-cased and punctuation becomes a space.

Encoders: a small ``UMT5EncoderModel`` for Wan (output width ``d_model`` = the transformer's
``text_dim``) and small ``CLIPTextModelWithProjection`` pairs for SD3 (``eos_token_id = 1``, so the
pooled output is read at the first ``</s>``; SD3 reads ``hidden_states[-2]``, so they need >= 2 layers)
plus a small ``T5EncoderModel`` as SD3's third encoder (so plain ``from_pretrained`` finds every component).
"""

from __future__ import annotations

from mixdit.pipelines.testbed.scenes import vocabulary

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2


def word_vocab() -> dict[str, int]:
    words = list(SPECIAL_TOKENS) + vocabulary()
    return {w: i for i, w in enumerate(words)}


def make_word_tokenizer(model_max_length: int = 32):
    """A ``transformers`` fast tokenizer over the caption vocabulary (see the module docstring)."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(word_vocab(), unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.Replace(Regex(r"[^a-z0-9\s<>/]"), " ")])
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                      special_tokens=[("</s>", EOS_ID)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def _t5_family_encoder(config_cls, model_cls, d_model: int, num_layers: int, num_heads: int, d_ff: int):
    config = config_cls(vocab_size=len(word_vocab()), d_model=d_model, d_kv=d_model // num_heads, d_ff=d_ff,
                        num_layers=num_layers, num_heads=num_heads, relative_attention_num_buckets=16,
                        relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                        pad_token_id=PAD_ID, eos_token_id=EOS_ID, decoder_start_token_id=PAD_ID)
    return model_cls(config)


def make_umt5_encoder(d_model: int = 128, num_layers: int = 2, num_heads: int = 4, d_ff: int = 256):
    """A small ``UMT5EncoderModel`` (Wan's text encoder)."""
    from transformers import UMT5Config, UMT5EncoderModel

    return _t5_family_encoder(UMT5Config, UMT5EncoderModel, d_model, num_layers, num_heads, d_ff)


def make_t5_encoder(d_model: int = 256, num_layers: int = 1, num_heads: int = 4, d_ff: int = 256):
    """A small ``T5EncoderModel`` (SD3's third text encoder; ``d_model`` = the joint attention dim)."""
    from transformers import T5Config, T5EncoderModel

    return _t5_family_encoder(T5Config, T5EncoderModel, d_model, num_layers, num_heads, d_ff)


def make_clip_encoder(hidden_size: int = 128, projection_dim: int = 128, num_layers: int = 2, num_heads: int = 4,
                      intermediate_size: int = 256, max_length: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(word_vocab()), hidden_size=hidden_size,
                            intermediate_size=intermediate_size, projection_dim=projection_dim,
                            num_hidden_layers=num_layers, num_attention_heads=num_heads,
                            max_position_embeddings=max_length, hidden_act="gelu", layer_norm_eps=1e-5,
                            bos_token_id=EOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return CLIPTextModelWithProjection(config)
