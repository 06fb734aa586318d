"""X-VILA: any-to-any chat over text, image, video and audio.

    from xvila import XVila
    model = XVila.from_pretrained("tiny-random")   # a preset, a checkpoint folder or a Hub repo
    chat = model.new_chat()
    for ev in chat.send("Make a video like this photo", media=["photo.jpg"], output="video"):
        ...

Nothing is built, loaded or downloaded at import time; the heavy modules (torch,
transformers, peft) are imported on first use of the names below.

How the code is laid out, along the data path of one turn: `media.py` reads a file;
`encoders/imagebind_preprocess.py` makes ImageBind's inputs; `XVila.encode` (`model.py`)
runs ImageBind and P_in (`projections.py`); `chat.py` keeps the history and builds the
prompt (`conversation.py`); `engine.py` decodes tokens and the generation-token states;
P_out maps them to E_text; `decoders/base.py` runs the denoising loop (the highway's
controller is `decoders/controller.py`) for the decoder in `decoders/image.py`, `video.py`
or `audio.py`. Loading goes one way: `fileio.py` is the only module that touches files
and the Hub, each part's loader sits beside the part, and `checkpoint.py` assembles the
whole model. Training: `train/phases.py` (the phases) and `train/loop.py` (the loop). The
README's architecture section has the table of modules and what each may import.
"""

from xvila.errors import ConfigError, WeightsUnavailableError, XVilaError

__all__ = ["XVila", "XVilaConfig", "Chat", "Event", "XVilaError", "WeightsUnavailableError", "ConfigError"]
__version__ = "0.1.0"

_LAZY = {"XVila": "xvila.model", "XVilaConfig": "xvila.config", "Chat": "xvila.chat", "Event": "xvila.chat"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'xvila' has no attribute {name!r}")
