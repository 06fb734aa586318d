"""X-VILA: any-to-any chat over text, image, video and audio.

    from xvila import XVila
    model = XVila.from_pretrained("tiny-random")   # a preset, a checkpoint folder or a Hub repo
    chat = model.new_chat()
    for ev in chat.send("Make a video like this photo", media=["photo.jpg"], output="video"):
        ...

Nothing is built, loaded or downloaded at import time; the heavy modules (torch,
transformers, peft) are imported on first use of the names below.
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
