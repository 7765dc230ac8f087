"""python -m services.localizer --bundle DIR: serve LocalizerService (flags and ICE_* environment, see --help)."""

import sys

from services.common.service import main
from services.common.settings import LocalizerSettings
from services.localizer.server import build_spec

if __name__ == "__main__":
    sys.exit(main("localizer", build_spec, settings_cls=LocalizerSettings, description=__doc__))
