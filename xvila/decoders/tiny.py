"""The tiny random decoders' sizes and toy vocabularies, in one place.

Each decoder's `tiny_random(seed, cond_dim)` builds its real layout (the same diffusers and
transformers classes as the full-size decoder) from these configs at toy sizes: a few
milliseconds per denoising step on a CPU, for tests and the `tiny-random` preset. The
configs are data only; `cond_dim` (the width of E_text) is filled in by the builder.
"""

from __future__ import annotations

from tokenizers import pre_tokenizers
from transformers import RobertaTokenizer

from xvila.constants import AUDIO, IMAGE, VIDEO

# Words the toy tokenizers know (anything else falls back to bytes). The video decoder's
# list is its own: the vocabulary sizes the text encoder, so changing a list changes the
# seeded weights of that tiny decoder.
TOY_WORDS = {
    IMAGE: ["a", "an", "the", "of", "and", "in", "on", "with", "dog", "cat", "bird", "car", "photo", "picture",
            "video", "sound", "music", "piano", "guitar", "barking", "playing", "running", "red", "blue", "green"],
    VIDEO: ["a", "an", "the", "of", "and", "in", "on", "with", "dog", "cat", "bird", "car", "video", "running",
            "playing", "walking", "red", "blue", "green", "beach", "street", "sky"],
}
TOY_WORDS[AUDIO] = TOY_WORDS[IMAGE]

# DPM-Solver++ with the betas of SD1.5 (= zeroscope's and VideoCrafter2's) and of AudioLDM.
SCHEDULERS = {
    IMAGE: dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                steps_offset=1, algorithm_type="dpmsolver++"),
    AUDIO: dict(num_train_timesteps=1000, beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear",
                steps_offset=1, algorithm_type="dpmsolver++"),
}
SCHEDULERS[VIDEO] = SCHEDULERS[IMAGE]

# SD1.5's layout: 32x32 images, 4x4x4 latents (the VAE still downsamples by 8), a 2-block
# U-Net, a 1-layer CLIP text encoder of width cond_dim.
IMAGE_UNET = dict(sample_size=4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),  # SD's order: attention first
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4, norm_num_groups=4)
IMAGE_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 norm_num_groups=4, sample_size=32)
CLIP_TEXT = dict(num_hidden_layers=1, num_attention_heads=4, max_position_embeddings=77)

# The video layout: 16x16-pixel frames, 4x8x8 latents per frame (a 2-block VAE that
# downsamples by 2), a 2-block 3D U-Net of widths 8/16.
VIDEO_SIZE = (16, 16)
VIDEO_UNET = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                  down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                  up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), attention_head_dim=4, norm_num_groups=4)
VIDEO_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 norm_num_groups=4, sample_size=16)

# AudioLDM's layout: 8 mel bins, a 64-sample hop at 16 kHz (250 frames a second), a VAE
# that downsamples by 2, a 2-block U-Net conditioned on a cond_dim CLAP embedding.
AUDIO_UNET = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),  # AudioLDM's order: attention last
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  cross_attention_dim=(8, 16),  # as AudioLDM: the block's own width (self-attention)
                  attention_head_dim=4, norm_num_groups=4, class_embed_type="simple_projection",
                  class_embeddings_concat=True)
AUDIO_VAE = dict(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                 down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                 norm_num_groups=4, sample_size=32)
CLAP_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, type_vocab_size=1)
VOCODER = dict(
    model_in_dim=8, sampling_rate=16000, upsample_initial_channel=16, upsample_rates=[4, 4, 4],
    upsample_kernel_sizes=[8, 8, 8], resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1, 3]],
    normalize_before=False,
    # The default init (0.01) gives a ~1e-8 waveform: silence once written as 16-bit PCM, so
    # outputs could not be told apart. 0.2 gives noise at about -30 dBFS.
    initializer_range=0.2,
)


def text_encoder_ids(tokenizer, cond_dim: int) -> dict:
    """What a tiny text encoder's config takes from its toy tokenizer, and E_text's width."""
    return dict(vocab_size=len(tokenizer), projection_dim=cond_dim, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def toy_roberta_tokenizer(words: list[str], model_max_length: int = 77) -> RobertaTokenizer:
    """A RoBERTa-style byte-level BPE over a few ASCII words, for tiny random models: the
    special tokens at RoBERTa's ids (<s>=0, <pad>=1, </s>=2, <unk>=3), every byte, merges
    that build each word left to right, alone and after a space ("Ġword"), <mask> last."""
    vocab = ["<s>", "<pad>", "</s>", "<unk>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(w.lower() for w in words):
        merged = word[0]
        for ch in word[1:]:
            merges.append((merged, ch))
            merged += ch
            vocab.append(merged)
        merges.append(("Ġ", word))
        vocab.append("Ġ" + word)
    vocab.append("<mask>")
    vocab = list(dict.fromkeys(vocab))
    merges = list(dict.fromkeys(merges))
    tokenizer = RobertaTokenizer(vocab={tok: i for i, tok in enumerate(vocab)}, merges=merges)
    tokenizer.model_max_length = model_max_length
    return tokenizer
