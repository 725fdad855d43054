"""The one rule for model and producer names, shared by the codec, validation and config.

Kept apart from :mod:`xentd.wire` so that reading the configuration needs neither
the codec nor NumPy.
"""

from __future__ import annotations

import re
from typing import Final

MODEL_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.:\-]{1,128}")  # always fullmatch
