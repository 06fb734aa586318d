"""Names and numbers used across the package, in one place."""

# Modalities, keyed as ImageBind keys them ("vision" covers images and video frames).
IMAGE, VIDEO, AUDIO, TEXT = "image", "video", "audio", "text"
MEDIA_MODALITIES = (IMAGE, VIDEO, AUDIO)

# CLIP / ImageBind pixel normalisation (official data.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ImageBind audio front end (official data.py): 16 kHz, 128 mel bins, 204 frames of 10 ms,
# normalised with the AudioSet mean/std used in training.
IMAGEBIND_SAMPLE_RATE = 16000
IMAGEBIND_AUDIO_MEAN = -4.268
IMAGEBIND_AUDIO_STD = 9.138

# Budgets that protect the demo and the data builders from hostile or huge files.
MAX_IMAGE_PIXELS = 64_000_000  # ~8000x8000; larger is treated as a decompression bomb
MAX_VIDEO_SECONDS = 600.0  # longer videos are refused before any frame is decoded
MAX_AUDIO_SECONDS = 600.0
# Video frames (animated GIFs included): 4K UHD per frame, and 60 fps for the longest video.
MAX_VIDEO_PIXELS = 3840 * 2160
MAX_VIDEO_FRAMES = 36_000
# Longest side over shortest side. The ImageBind preprocessing scales the short side to 224,
# so a 61504x48 GIF frame (within the pixel budget) would become 224x287019 pixels.
MAX_ASPECT_RATIO = 50

# The decoders with a visual controller: the visual embedding highway and phase 3b.
VISUAL = (IMAGE, VIDEO)

# The variants of a generated medium (paper, section 3.3), also accepted as `decoding=`.
TA, TA_VEH, TEXT_ALIGNED = "TA", "TA+VEH", "text-aligned"
