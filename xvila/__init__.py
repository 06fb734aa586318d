"""X-VILA: any-to-any chat over text, image, video and audio.

Nothing is built or loaded at import time; see `xvila.media` for media input/output and
`xvila.encoders.imagebind` for the ImageBind encoders.
"""

from xvila.errors import ConfigError, WeightsUnavailableError, XVilaError

__all__ = ["XVilaError", "WeightsUnavailableError", "ConfigError"]
__version__ = "0.1.0"
