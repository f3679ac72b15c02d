"""Run configuration: ``schema`` (the dataclasses and their ranges) and ``load`` (YAML, overrides,
cross-field checks). ``from hkd.config import Config, load_config, ...`` is the import path for
every public name of both.

May import: :mod:`hkd.errors` only.
"""

from hkd.config.load import *  # noqa: F401,F403
from hkd.config.schema import *  # noqa: F401,F403
from hkd.errors import ConfigError  # noqa: F401  (0.1 exported it here)
