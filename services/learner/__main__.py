"""`python -m services.learner --bundle DIR --job-store DIR`: the learner gRPC server."""

import sys

from services.common.service import main
from services.common.settings import LearnerSettings
from services.learner.server import build_spec

if __name__ == "__main__":
    sys.exit(main("learner", build_spec, settings_cls=LearnerSettings,
                  description="ICE stage 2: structured concept learning as durable long-running jobs."))
