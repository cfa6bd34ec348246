"""Exceptions raised by tunio. Each one names the layer that failed."""


class TunioError(Exception):
    """Base class of every error tunio raises on purpose."""


class TunError(TunioError, OSError):
    """The TUN device could not be opened or configured (errno set)."""


class StackError(TunioError, OSError):
    """The C stack could not be created or failed while running (errno set)."""


class ConfigError(TunioError, ValueError):
    """A setting or specification given by the user is not acceptable."""


class DialError(TunioError, OSError):
    """A dialer could not reach the destination; errno is what the app will see."""
