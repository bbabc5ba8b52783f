"""peftcore's release and the version of its plugin contract (``peftcore/hookspecs.py``)."""

__version__ = "0.1.0"
#: The version of the hook specifications a plugin is written against. A plugin may declare the
#: version it was written for as ``PEFTCORE_HOOKSPEC_VERSION = N`` in its entry-point module
#: (absent: 1). Adding a hook or an optional argument keeps the number; renaming a hook or
#: changing what it means bumps it, and plugins declaring a version outside
#: ``SUPPORTED_HOOKSPEC_VERSIONS`` are listed as incompatible instead of being loaded.
HOOKSPEC_VERSION = 2
SUPPORTED_HOOKSPEC_VERSIONS = (1, 2)
