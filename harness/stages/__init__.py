"""One case on one adapter, by job: inputs, verdicts, and the run that joins them.

`harness.stages.inputs` builds a case's inputs from its seed (teacher-forced stage inputs, a
layer's tensors), `harness.stages.verdicts` judges one output against the reference's
(`Comparison`, `Outcome`, the derived budgets), and `harness.stages.run` runs a case's reference
and kernel and joins the verdicts (`run_case`). Diagnoses of a failing output live in
harness.diagnose. This package re-exports what the runner uses.
"""

from __future__ import annotations

from harness.stages.run import run_case
from harness.stages.verdicts import Comparison, Outcome

__all__ = ["Comparison", "Outcome", "run_case"]
