"""Every stage in one run: a validated config (``config``), the run itself (``run``), its HTML report
(``report``), and the heads-domain benchmark and demo built on it (``benchmark``)."""

from handsoff.pipeline.config import PipelineConfig, load_config
from handsoff.pipeline.run import run_pipeline

__all__ = ["PipelineConfig", "load_config", "run_pipeline"]
