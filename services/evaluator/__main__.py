"""`python -m services.evaluator --bundle DIR`: serve the EvaluatorService until SIGTERM."""

import sys

from services.common.service import main
from services.common.settings import EvaluatorSettings
from services.evaluator.server import build_spec

if __name__ == "__main__":
    sys.exit(main("evaluator", build_spec, settings_cls=EvaluatorSettings,
                  description="UCE concept metrics (CLIP, DINO) and mask metrics as a gRPC service."))
